"""Config validation: every user mistake is one clear message naming the key, before anything starts."""

from __future__ import annotations

import pytest

from poptrain.config import ConfigError, dump_config, load_config
from poptrain.driver.checks import inspect_population, prepare
from tests.conftest import prelu_member


def problems(config, overrides=()):
    with pytest.raises(ConfigError) as info:
        prepare(config, overrides)
    return info.value.problems


def test_valid_config_resolves_every_default(base_config):
    cfg = load_config(base_config())
    assert cfg.exchange.every == 1 and cfg.exchange.mode == "sync"
    assert cfg.members[0].optimizer.name == "adam"
    text = dump_config(cfg)
    assert "margin: 2.0" in text and "batch_size: 32" in text
    assert load_config(base_config()).model_dump() == cfg.model_dump()


def test_overrides_address_list_items_by_index_or_member_name(base_config):
    cfg = load_config(base_config(), ["members.0.optimizer.lr=0.5", "members.m2.optimizer.name=sgd", "steps=7", "couplings.0.margin=3"])
    assert cfg.members[0].optimizer.lr == 0.5
    assert cfg.member("m2").optimizer.name == "sgd"
    assert cfg.steps == 7 and cfg.couplings[0].margin == 3.0


def test_the_schema_validates_each_coupling_as_its_own_types_config(base_config):
    """The run's schema alone (no cross-reference checks) gives each coupling its own type's config
    class, a registered name or an import path alike, and places each mistake at its key."""
    from pydantic import ValidationError

    from poptrain.config import RunConfig
    from poptrain.couplings.separation import SeparationConfig
    from tests.reference import TowardPeersMeanConfig

    user = {"type": "tests.reference:TowardPeersMean", "param": "activation.weight"}
    cfg = RunConfig.model_validate(base_config(couplings=[{"type": "separation", "param": "activation.weight", "margin": 3}, user]))
    assert [type(c) for c in cfg.couplings] == [SeparationConfig, TowardPeersMeanConfig]
    assert cfg.couplings[0].margin == 3.0 and cfg.model_dump()["couplings"][0]["margin"] == 3.0  # serialized with its own fields

    broken = [{"type": "separation", "param": "activation.weight", "margin": -1}, {"type": "separatoin"}, {**user, "weight": "x"}]
    with pytest.raises(ValidationError) as caught:
        RunConfig.model_validate(base_config(couplings=broken))
    located = {".".join(map(str, e["loc"])): e["msg"] for e in caught.value.errors()}
    assert set(located) == {"couplings.0.margin", "couplings.1.type", "couplings.2.weight"}, located
    assert "unknown coupling type 'separatoin'" in located["couplings.1.type"]


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"steps": -3}, "steps", "greater than 0"),
        ({"steps": "many"}, "steps", "integer"),
        ({"stpes": 3}, "stpes", "unknown key"),
        ({"members": []}, "members", "empty"),
        ({"exchange": {"every": 0}}, "exchange.every", "greater than or equal to 1"),
        ({"exchange": {"mode": "telepathy"}}, "exchange.mode", "sync"),
        ({"couplings": [{"type": "separation", "param": "activation.weight", "members": ["m1", "m9"]}]}, "couplings.0.members", "unknown member 'm9'"),
        ({"couplings": [{"type": "separation", "param": "activation.weight", "trains": ["ghost"]}]}, "couplings.0.trains", "unknown member 'ghost'"),
        ({"couplings": [{"type": "telekinesis"}]}, "couplings.0.type", "unknown coupling type"),
        ({"couplings": [{"type": "separation"}]}, "couplings.0.param", "required"),
        ({"couplings": [{"type": "separation", "param": "activation.weight", "margin": "wide"}]}, "couplings.0.margin", "number"),
        ({"couplings": [{"type": "nowhere.module:Coupling"}]}, "couplings.0.type", "cannot import"),
    ],
)
def test_schema_errors_name_the_key(base_config, change, key, words):
    found = problems(base_config(**change))
    assert any(k == key and words in msg for k, msg in found), found


def test_duplicate_member_names_are_refused(base_config):
    found = problems(base_config(members=[prelu_member("m1"), prelu_member("m1")]))
    assert ("members.1.name", "duplicate member name 'm1'") in found


@pytest.mark.parametrize(
    "member_change, key, words",
    [
        ({"frozen": ["lstm.*"]}, "members.0.frozen", "matches no parameter"),
        ({"optimizer": {"name": "adam", "groups": [{"params": "nothing.*", "lr": 0.1}]}}, "members.0.optimizer.groups.0.params", "matches no parameter"),
        ({"optimizer": {"name": "adam", "kwargs": {"momentum": 0.9}}}, "members.0.optimizer", "momentum"),
        ({"optimizer": {"name": "lion"}}, "members.0.optimizer", "unknown optimizer"),
        ({"model": {"name": "transformer9000"}}, "members.0.model.name", "unknown model"),
        ({"model": {"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "activation": "swish9"}}}, "members.0.model", "unknown activation"),
        ({"model": {"name": "mlp", "kwargs": {"in_features": 20, "width": 3}}}, "members.0.model", "width"),
        ({"model": {"name": "no_such_pkg.models:Net"}}, "members.0.model.name", "cannot import module"),
        ({"model": {"name": "tests.helpers:Missing"}}, "members.0.model.name", "has no attribute"),
        ({"data": {"name": "digits", "kwargs": {"colour": "red"}}}, "members.0.data", "colour"),
        ({"loss": "hinge_of_doom"}, "members.0.loss.name", "unknown loss"),
        ({"init": "/nonexistent/weights.pt"}, "members.0.init", "no such file"),
        ({"frozen": ["*"]}, "members.0.optimizer", "nothing to optimize"),
    ],
)
def test_model_dependent_errors_are_found_before_ray_starts(base_config, member_change, key, words):
    found = problems(base_config(members=[prelu_member("m1", **member_change), prelu_member("m2")]))
    assert any(k == key and words in msg for k, msg in found), found


def test_coupling_on_a_parameter_a_member_lacks_is_refused(base_config):
    config = base_config(couplings=[{"type": "separation", "param": "activation.slope"}])
    found = problems(config)
    assert any(k == "couplings.0.param" and "has no parameter 'activation.slope'" in msg for k, msg in found), found


def test_a_users_coupling_reading_a_parameter_a_member_lacks_is_refused_naming_coupling_and_parameter(base_config):
    """A coupling by import path that checks nothing itself: its reads are checked against the
    members' real parameters, before anything starts (not a KeyError in the coordinator)."""
    config = base_config(couplings=[{"type": "tests.reference:TowardPeersMean", "name": "pull", "param": "activation.slope"}])
    found = problems(config)
    assert (
        "couplings.0",
        "coupling 'pull' reads parameter 'activation.slope' of member 'm1', which has no such parameter; "
        "its parameters are ['input.weight', 'input.bias', 'activation.weight', 'output.weight', 'output.bias']",
    ) in found, found


def test_separation_needs_equal_shapes(base_config):
    other = prelu_member("m2", model={"name": "tests.helpers:TinyNet"})
    found = problems(base_config(members=[prelu_member("m1"), other], couplings=[{"type": "separation", "param": "head.weight"}]))
    assert any("has no parameter 'head.weight'" in msg for _, msg in found)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "line" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax_is_a_config_error(base_config):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(base_config(), ["steps"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(base_config(), ["members.7.optimizer.lr=1"])


def test_user_classes_by_import_path_are_inspected(base_config):
    member = prelu_member("m1", model={"name": "tests.helpers:TinyNet"}, data={"name": "tests.helpers:tiny_data"})
    population = inspect_population(load_config(base_config(members=[member], couplings=[])))
    assert population.param_shapes["m1"]["body.weight"] == (8, 4)


def test_unreachable_tracking_server_stops_before_anything_starts(base_config):
    found = problems(base_config(tracking={"uri": "http://127.0.0.1:9"}))
    assert any(k == "tracking.uri" and "cannot reach" in msg for k, msg in found), found


def test_a_bug_in_a_user_couplings_check_config_is_a_config_problem_with_its_traceback(base_config):
    """Nothing starts (a ConfigError, exit 2), and the message carries where the user's code failed."""
    coupling = {"type": "tests.helpers:BuggyCheckSeparation", "param": "activation.weight", "margin": 2.0}
    with pytest.raises(ConfigError) as info:
        prepare(base_config(couplings=[coupling]))
    text = info.value.render()
    assert "couplings.0: BuggyCheckSeparation.check_config raised KeyError: 'activation.weight'" in text, text
    assert "Traceback (most recent call last)" in text, text
    assert "_buggy_lookup" in text and "tests/helpers.py" in text, "the user's own frames are shown"
    assert "validate_config" not in text, "poptrain's own frame is left out"
    assert text.index("_buggy_lookup") > text.index("check_config raised"), "the traceback follows its problem"


def test_inside_a_ray_job_relative_outputs_and_the_default_store_resolve_against_poptrain_home(base_config, tmp_path, monkeypatch):
    """What Ray's job supervisor gives a job's entrypoint: its working dir is a temporary copy, so
    relative paths resolve against $POPTRAIN_HOME instead (issue 14)."""
    import json
    import os

    job_dir, home = tmp_path / "_ray_pkg_0123", tmp_path / "home"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POPTRAIN_HOME", str(home))
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {"job_submission_id": "raysubmit_1"}})
    )

    def config(output_dir, **tracking):
        return {**base_config(tracking={"experiment": "e", **tracking}), "output_dir": str(output_dir)}

    cfg, _, uri = prepare(config("runs"))
    assert cfg.run_dir == home / "runs" / "pop"
    assert uri == f"sqlite:///{home / 'mlflow.db'}"
    assert "/_ray_pkg_0123" not in dump_config(cfg)
    from poptrain.config import job_artifact_root

    assert job_artifact_root(uri) == str(home / "mlruns")

    # An absolute path into the job's working dir would be deleted with it: refused before anything starts.
    found = problems(config(os.path.join(job_dir, "out")))
    assert any(k == "output_dir" and "inside the Ray job's working directory" in m for k, m in found), found
    found = problems(config("runs", uri=f"sqlite:///{job_dir / 'x.db'}"))
    assert any(k == "tracking.uri" and "inside the Ray job's working directory" in m for k, m in found), found

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job: the working directory, as before
    cfg, _, uri = prepare(config("runs"))
    assert cfg.output_dir == "runs" and uri == f"sqlite:///{job_dir / 'mlflow.db'}"
