"""A population defined in a few lines: an entry's `copies` and `vary` make members that differ in
a few values, the same in `poptrain check`, the run, MLflow and a resume; bad variation is refused
before anything starts; and a run's saved record is as compact as what the user wrote, so a
thousand members resume after their driver is killed."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.cli import main
from poptrain.config import MAX_CONFIG_BYTES, ConfigError, dump_config, load_config
from tests.conftest import (
    PBT_YAML_OVERRIDES,
    REPO,
    SEED_MODULE,
    InBackground,
    prelu_member,
    resume_in_a_process,
    run_killing_the_driver,
    started,
    weights,
)

THOUSAND = REPO / "configs" / "thousand.yaml"


def varied(members: int | None = None, **vary) -> dict:
    """A config of one entry, seed 000's member, varied as given."""
    entry = {**prelu_member("m"), "vary": vary}
    if members is not None:
        entry["copies"] = members
    return {"name": "v", "steps": 2, "members": [entry]}


def reloaded(cfg, tmp_path):
    """``cfg``'s saved record, written as a run writes it and read as `poptrain resume` reads it."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    return load_config(path, record=True), path


# -- what an entry makes ---------------------------------------------------------------------


def test_lists_are_zipped_member_by_member_and_set_the_number_of_members():
    cfg = load_config(varied(**{"optimizer.lr": [0.1, 0.2, 0.3], "model.kwargs.hidden": [8, 16, 32]}))
    assert cfg.member_names == ["m0", "m1", "m2"]
    assert [(m.optimizer.lr, m.model.kwargs["hidden"]) for m in cfg.members] == [(0.1, 8), (0.2, 16), (0.3, 32)]
    assert cfg.varied_values()["m1"] == {"optimizer.lr": 0.2, "model.kwargs.hidden": 16}


def test_grid_keys_multiply_and_copies_repeat_the_grid_as_tune_orders_it():
    cfg = load_config(varied(2, **{"optimizer.lr": {"grid": [0.1, 0.01]}, "optimizer.kwargs.weight_decay": {"grid": [0.0, 0.001, 0.01]}}))
    assert len(cfg.members) == 12 and cfg.member_names[:2] == ["m00", "m01"] and cfg.member_names[-1] == "m11"
    points = [(m.optimizer.lr, m.optimizer.kwargs["weight_decay"]) for m in cfg.members]
    grid = [(lr, wd) for lr in (0.1, 0.01) for wd in (0.0, 0.001, 0.01)]
    assert points == grid + grid, "sample-major: the whole grid, then the whole grid again"


def test_draws_come_from_the_run_seed_and_a_member_keeps_its_draws_whatever_else_is_varied():
    lr = {"optimizer.lr": {"loguniform": [1e-4, 1e-1]}}
    a = load_config(varied(5, **lr))
    b = load_config(varied(5, **lr, **{"model.kwargs.hidden": {"randint": [4, 64]}, "optimizer.kwargs.weight_decay": {"choice": [0.0, 0.1]}}))
    other_seed = load_config({**varied(5, **lr), "seed": 1})
    lrs = [m.optimizer.lr for m in a.members]
    assert all(1e-4 <= v <= 1e-1 for v in lrs) and len(set(lrs)) == 5
    assert [m.optimizer.lr for m in b.members] == lrs, "adding varied keys changes no member's other draws"
    assert [m.optimizer.lr for m in load_config(varied(5, **lr)).members] == lrs, "the same run draws the same"
    assert [m.optimizer.lr for m in other_seed.members] != lrs
    assert all(4 <= m.model.kwargs["hidden"] < 64 and m.optimizer.kwargs["weight_decay"] in (0.0, 0.1) for m in b.members)


def test_an_override_addresses_one_made_member_or_a_varied_key():
    cfg = load_config(varied(3, **{"optimizer.lr": [0.1, 0.2, 0.3]}), ["members.m1.optimizer.lr=0.5", "members.m.vary.model.kwargs.hidden=[4, 5, 6]"])
    assert [m.optimizer.lr for m in cfg.members] == [0.1, 0.5, 0.3]
    assert [m.model.kwargs["hidden"] for m in cfg.members] == [4, 5, 6]


@pytest.mark.parametrize(
    "vary, members, key, reason",
    [
        ({"optimizer.nosuch": [1, 2]}, None, "members.0.vary.optimizer.nosuch", "unknown key 'optimizer.nosuch'"),
        ({"copies": [1, 2]}, None, "members.0.vary.copies", "cannot be varied"),
        ({"optimizer.lr": []}, 2, "members.0.vary.optimizer.lr", "is empty"),
        ({"optimizer.lr": [0.1, 0.2], "model.kwargs.hidden": [8, 16, 32]}, None, "members.0.vary", "give them equal lengths, or use `{grid: [...]}`"),
        ({"optimizer.lr": [0.1, 0.2]}, 3, "members.0.vary.optimizer.lr", "has 2 values, but `copies` is 3"),
        ({"optimizer.lr": {"uniform": [0.2, 0.1]}}, 2, "members.0.vary.optimizer.lr", "low <= high"),
        ({"optimizer.lr": {"loguniform": [0.0, 0.1]}}, 2, "members.0.vary.optimizer.lr", "0 < low"),
        ({"model.kwargs.hidden": {"randint": [8, 8]}}, 2, "members.0.vary.model.kwargs.hidden", "high is excluded"),
        ({"optimizer.lr": {"uniform": [0.1, 0.2], "choice": [1]}}, 2, "members.0.vary.optimizer.lr", "exactly one of"),
        ({"optimizer.lr": {"normal": [0, 1]}}, 2, "members.0.vary.optimizer.lr.normal", "Extra inputs"),
        ({"optimizer.lr": [0.1, -0.1]}, None, "members.m1.optimizer.lr", "greater than 0"),
    ],
)
def test_bad_variation_is_refused_before_anything_starts_naming_the_key(tmp_path, capsys, vary, members, key, reason):
    config = varied(members, **vary)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert [k for k, _ in caught.value.problems] == [key] and reason in caught.value.problems[0][1]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_check_lists_every_member_with_its_drawn_values(tmp_path, capsys):
    path = tmp_path / "v.yaml"
    path.write_text(
        yaml.safe_dump(
            {**varied(3, **{"optimizer.lr": {"uniform": [0.01, 0.1]}}), "output_dir": str(tmp_path), "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}}
        )
    )
    assert main(["check", str(path)]) == 0
    printed = capsys.readouterr().out
    for member in load_config(path).members:
        assert f"# {member.name}: optimizer.lr={member.optimizer.lr!r}" in printed


# -- the saved record ------------------------------------------------------------------------


def test_a_thousand_members_are_saved_as_the_entry_that_makes_them(tmp_path):
    cfg = load_config(THOUSAND)
    again, path = reloaded(cfg, tmp_path)
    assert path.stat().st_size < 8 * 1024, "the record grows with what the user wrote"
    assert again.model_dump() == cfg.model_dump()
    assert len(dump_config(load_config(cfg))) == path.stat().st_size, "as `poptrain run` saves it, handed the checked config"


def test_drawn_values_are_part_of_the_record(tmp_path):
    cfg = load_config(THOUSAND, ["members.m.vary={optimizer.lr: {loguniform: [0.001, 0.1]}}"])
    again, path = reloaded(cfg, tmp_path)
    assert again.model_dump() == cfg.model_dump()
    assert yaml.safe_load(path.read_text())["members"][0]["vary"]["optimizer.lr"] == [m.optimizer.lr for m in cfg.members]
    assert path.stat().st_size < MAX_CONFIG_BYTES


def test_a_member_an_override_changed_is_recorded_as_it_ran(tmp_path):
    """One made member changed in a key its entry does not vary: the entry is saved member by member
    (the record is then larger than a config a user hands in, and still loads as a record)."""
    cfg = load_config(THOUSAND, ["members.m007.data.batch_size=16"])
    again, path = reloaded(cfg, tmp_path)
    assert again.member("m007").data.batch_size == 16 and again.model_dump() == cfg.model_dump()
    assert path.stat().st_size > MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)  # the guard stays for what users hand in


# -- pbt.yaml, written with vary -------------------------------------------------------------

WRITTEN_OUT = REPO / "tests" / "data" / "pbt_written_out.yaml"  # configs/pbt.yaml before `vary`: m1 ... m8


def test_pbt_yaml_makes_the_eight_members_it_wrote_out_before():
    varied_members = load_config(REPO / "configs" / "pbt.yaml").members
    written = load_config(WRITTEN_OUT).members
    assert [m.model_dump(exclude={"name"}) for m in varied_members] == [m.model_dump(exclude={"name"}) for m in written]


def test_pbt_yaml_with_vary_ends_bitwise_as_the_written_out_file(ray_session, tmp_path, tracking_uri, experiment, pbt_yaml_run):
    """Explore, exploit and training: member j of the varied file ends as member j of the file that
    wrote the eight out (a member's streams follow its position, not its name). The varied file's
    run is the session's (tests/conftest.py); the written-out file runs with the same overrides."""
    overrides = [*PBT_YAML_OVERRIDES, f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", f"output_dir={tmp_path}"]
    new, old = pbt_yaml_run, poptrain.run(WRITTEN_OUT, overrides)
    assert (new.output_dir / "pbt_events.json").read_text().count("receiver") > 0, "exploits happened"
    for j in range(8):
        a, b = weights(new.output_dir, f"m{j}"), weights(old.output_dir, f"m{j + 1}")
        assert all(torch.equal(a[k], b[k]) for k in a), f"member {j}"
    client = MlflowClient(tracking_uri)
    params = client.get_run(new.member_run_ids["m4"]).data.params
    assert params["optimizer.lr"] == "0.03" and params["optimizer.kwargs.weight_decay"] == "0.0", "a member's varied values are its params"


# -- a thousand members resume ---------------------------------------------------------------


THOUSAND_STEPS, THOUSAND_KILL_AFTER = 40, 20


def killed_and_resumed(folder, uri):
    """configs/thousand.yaml, all 1,000 members with seed 000's own Module by import path for their
    model, as a real `poptrain run` SIGKILLed with its Ray after its first checkpoint, then
    `poptrain resume`, each a process of its own: (run folder, the checkpoint's step it resumed from)."""

    config = yaml.safe_load(THOUSAND.read_text())
    config["members"][0]["model"] = SEED_MODULE
    # Killed after the checkpoint at step 20, resumed from it for 20 more: logged steps (every 10)
    # on both sides of the kill. A thousand members' start-up, metrics and checkpoints cost tens
    # of seconds, each; their steps are cheap.
    config.update(
        steps=THOUSAND_STEPS,
        output_dir=str(folder / "runs"),
        checkpoint={"every": THOUSAND_KILL_AFTER},
        evaluation={"every": THOUSAND_KILL_AFTER, "metrics": ["mse"]},
    )
    config["tracking"] = {**config["tracking"], "uri": uri, "experiment": "thousand-resumed", "plots": False}
    run_dir, killed_at = run_killing_the_driver(copy.deepcopy(config), folder, THOUSAND_KILL_AFTER)
    resume_in_a_process(run_dir, folder)
    return run_dir, killed_at


def start_killed_and_resumed() -> InBackground:
    return InBackground(killed_and_resumed, "poptrain-thousand-")


def test_a_thousand_members_resume_after_their_driver_is_killed_with_every_history_whole(request):
    """configs/thousand.yaml, all 1,000 members with seed 000's own Module (a user's model by import
    path), as a real `poptrain run` SIGKILLed with its Ray after its first checkpoint, then
    `poptrain resume`: the members trained stacked, 500 to a host (as resumed); every
    member's logged steps exactly once across the kill; and the run ends as every shipped config
    must (tests/test_configs.py, which leaves thousand.yaml to this test): each member trained to a
    finite loss and was evaluated on held-out data at the end, and the parent run has the
    population's ranking and best member."""
    import math

    work = started(request, start_killed_and_resumed)  # its run started with the session, beside the suite
    (run_dir, killed_at), steps, every, tracking_uri = work.result(), THOUSAND_STEPS, THOUSAND_KILL_AFTER, work.uri
    assert killed_at == every, "resumed from the first checkpoint, before the run's end"
    assert (run_dir / "config.yaml").stat().st_size < 8 * 1024
    record = yaml.safe_load((run_dir / "run.json").read_text())
    assert len(record["members"]) == 1000
    client = MlflowClient(tracking_uri)
    parent = client.get_run(record["parent"])
    assert parent.info.status == "FINISHED"
    for member, run_id in record["members"].items():
        history = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert len(history) == len(set(history)) and set(range(0, steps, 10)) <= set(history), f"{member}: every logged step exactly once, across the kill"

    ranking = f"eval/{load_config(THOUSAND).evaluation.ranking.key}"
    members = {
        r.data.tags["poptrain.member"]: r
        for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{record['parent']}'", max_results=1000)
    }
    assert {m: r.info.run_id for m, r in members.items()} == record["members"]
    for member, run in members.items():
        assert run.data.tags["poptrain.placement.stacked_with"] == "500", f"{member}: stacked with its host's 499 others"
        assert math.isfinite(run.data.metrics["loss"]), member
        assert ranking in run.data.metrics, f"{member}: evaluated on held-out data at the end"
    assert {f"{ranking}/median", f"best/{ranking}"} <= set(parent.data.metrics)
    best = parent.data.tags["poptrain.best_member"]
    assert members[best].data.metrics[ranking] == parent.data.metrics[f"best/{ranking}"] == min(r.data.metrics[ranking] for r in members.values())


def test_a_config_without_members_still_says_the_key_is_missing():
    with pytest.raises(ConfigError) as caught:
        load_config({"name": "v", "steps": 2})
    assert caught.value.problems == [("members", "required key is missing")]


def test_a_key_inside_an_optional_part_of_a_member_can_be_varied():
    # `eval_data` is `EvalDataConfig | None`: the check of a varied key looks through the None.
    config = varied(**{"eval_data.batch_size": [16, 32]})
    config["members"][0]["eval_data"] = dict(config["members"][0]["data"])
    assert [m.eval_data.batch_size for m in load_config(config).members] == [16, 32]
