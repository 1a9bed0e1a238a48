"""Populations from Python objects: the documentation's notebook example (docs/python.md) (seed 000 with no YAML and no
package) runs on a real Ray into a real MLflow store and matches the single-process reference; the
record names each object with a digest; `poptrain resume` says whether such a run can continue;
what cannot travel to Ray's workers is refused before anything starts."""

from __future__ import annotations

import linecache
import re

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import poptrain
from poptrain.config import ConfigError, objects
from poptrain.couplings import COUPLINGS
from poptrain.driver.checks import prepare
from tests.conftest import REPO, SEED000_BATCH, SEED000_LR, poptrain_command, seed000_initial_modules, weights
from tests.reference import seed000_joint_training, sequential_batches

STEPS = 25


def notebook_cell(code: str, cell: int = 1) -> dict:
    """``code`` run as a notebook runs a cell: in a namespace named `__main__` that no worker can
    import (so cloudpickle sends what it defines by value), with its source where `inspect` finds a
    cell's (IPython puts each cell in `linecache`)."""
    filename = f"<notebook-cell-{cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(code, filename, "exec"), namespace)
    return namespace


def readme_example() -> str:
    """The documentation's notebook example (docs/python.md) up to its `poptrain.run` call."""
    page = (REPO / "docs" / "python.md").read_text(encoding="utf-8")
    code = re.search(r"## From a notebook.*?```python\n(.*?)```", page, re.S).group(1)
    assert code.count("\n") <= 40, "about twenty lines, no YAML"
    return code[: code.index("result = poptrain.run(population)")]


@pytest.fixture(scope="module")
def notebook():
    cell = notebook_cell(readme_example())
    yield cell
    COUPLINGS.pop("slopes_apart", None)  # the cell registered its coupling in this process


@pytest.fixture(scope="module")
def notebook_run(ray_session, notebook, tmp_path_factory, tracking_uri):
    """The example's population as the notebook defines it, run on Ray for the reference: seed 000's
    initial weights, data in order, one member per process. m1 gets its data from the notebook's
    function, m2 the dataset itself."""
    folder = tmp_path_factory.mktemp("notebook")
    modules, paths = seed000_initial_modules(folder)
    population = notebook["population"]
    dataset = notebook["regression"]()
    for member, init, data in zip(population["members"], paths, (notebook["regression"], dataset), strict=True):
        member.update(init=init, data={"name": data, "batch_size": SEED000_BATCH, "shuffle": False})
    population.update(
        steps=STEPS,
        output_dir=str(folder / "runs"),
        placement={"members_per_host": 1},
        tracking={"uri": tracking_uri, "experiment": "notebook", "plots": False, "log_models": False},
    )
    result = poptrain.run(population)
    reference = seed000_joint_training(*modules, sequential_batches(dataset, SEED000_BATCH), STEPS, SEED000_LR)
    return result, {name: module.state_dict() for name, module in zip(("m1", "m2"), reference, strict=True)}, dataset


def assert_reference_weights(output_dir, reference):
    for name, state in reference.items():
        trained = weights(output_dir, name)
        for key, expected in state.items():
            assert torch.equal(trained[key], expected), f"{name}.{key}: {(trained[key] - expected).abs().max()}"


def test_the_notebook_example_matches_the_single_process_seed_000_reference_bitwise(notebook, notebook_run):
    result, reference, _ = notebook_run
    assert_reference_weights(result.output_dir, reference)
    slopes = [weights(result.output_dir, name)["activation.weight"] for name in ("m1", "m2")]
    assert float((slopes[0] - slopes[1]).abs()) > 0.1, "the coupling acted"
    assert "coupling/slopes_apart" in result.metrics["m1"]


def test_the_record_names_each_object_with_a_digest(notebook, notebook_run):
    from mlflow import MlflowClient

    result, _, dataset = notebook_run
    record = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    m1, m2 = record["members"]
    assert m1["model"] == {"name": "__main__:Module", "kwargs": {"in_features": 20, "out_features": 1}, "digest": objects.digest(notebook["Module"])}
    assert m1["model"]["digest"].startswith("source:sha256:"), "a class from a notebook: its functions' sources"
    assert (m1["data"]["name"], m1["data"]["digest"]) == ("__main__:regression", objects.digest(notebook["regression"]))
    assert m2["data"]["name"] == "torch.utils.data.dataset:TensorDataset" and m2["data"]["digest"] == objects.digest(dataset)
    assert m2["data"]["digest"].startswith("pickle:sha256:"), "an instance: its pickle"
    assert m1["loss"]["name"] == "torch.nn.functional:mse_loss" and m1["loss"]["digest"].startswith("source:sha256:")
    (coupling,) = record["couplings"]
    assert (coupling["type"], coupling["name"], coupling["digest"]) == ("__main__:slopes_apart", "slopes_apart", objects.digest(notebook["slopes_apart"]))
    params = MlflowClient(result.tracking_uri).get_run(result.member_run_ids["m1"]).data.params
    assert (params["model.name"], params["model.digest"]) == ("__main__:Module", m1["model"]["digest"])


def test_resume_from_the_command_line_says_the_run_cannot_continue(notebook_run, tmp_path):
    result, _, _ = notebook_run
    done = poptrain_command("resume", str(result.output_dir), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert (
        "members.0.model.name: the run was started with the Python object `__main__:Module`, defined in a notebook or a script's "
        "`__main__`, which cannot be imported here"
    ) in message
    assert "members.1.data.name: the run was started with an instance of `torch.utils.data.dataset:TensorDataset`" in message
    assert "couplings.0.type: the run was started with the Python object `__main__:slopes_apart`" in message
    assert "members.0.loss" not in message, "torch's mse_loss imports by its name, with its digest"
    assert "this run cannot continue" in message and "poptrain.resume(<its folder>, objects=[Module, regression, slopes_apart]" in message


def test_resume_from_python_with_the_same_objects_continues_and_refuses_changed_ones(notebook, notebook_run):
    result, reference, _ = notebook_run
    given = [notebook["Module"], notebook["regression"], notebook["regression"](), notebook["slopes_apart"]]  # the data made anew: the same bytes
    cfg, _, _ = prepare(result.output_dir / "config.yaml", record=True, given=given)
    assert cfg.members[0].model.given is notebook["Module"] and cfg.couplings[0].given is notebook["slopes_apart"]

    changed = notebook_cell(readme_example().replace("2 * in_features", "3 * in_features"), cell=2)
    with pytest.raises(ConfigError) as caught:
        prepare(result.output_dir / "config.yaml", record=True, given=[changed["Module"], *given[1:]])
    assert "members.0.model: the object given, `__main__:Module`, is not the one recorded: its digest is" in " ".join(caught.value.render().split())

    resumed = poptrain.resume(result.output_dir, objects=given)
    assert resumed.run_id == result.run_id
    assert_reference_weights(result.output_dir, reference)


def test_a_digest_is_of_the_code_so_a_new_session_with_the_same_cell_finds_the_same_objects(notebook):
    again = notebook_cell(readme_example(), cell=7)  # a cell run again re-registers its coupling's name
    for name in ("Module", "regression", "slopes_apart"):
        assert again[name] is not notebook[name] and objects.digest(again[name]) == objects.digest(notebook[name]), name


def test_every_place_that_takes_an_import_path_takes_the_object(base_config):
    """A model class, a data function, a loss, a term, a gradient transform, an optimizer class, a
    metric and a coupling class: checked as their import paths are, resolved to the objects, and a
    dataset given once to a 50-member entry is one object, not 50 copies."""
    from poptrain.builtins.losses import LOSSES
    from poptrain.builtins.metrics import METRICS
    from poptrain.builtins.terms import TERMS
    from poptrain.components.build import optimizer_class, resolve_grad_transforms, resolve_loss, resolve_metrics, resolve_terms
    from poptrain.couplings.separation import Separation
    from tests import helpers

    dataset = helpers.tiny_data()
    member = {
        "name": "m",
        "copies": 50,
        "model": helpers.TinyNet,
        "data": dataset,
        "loss": LOSSES["mse"],
        "optimizer": {"name": torch.optim.SGD, "lr": 0.1},
        "terms": [{"name": "l2", "fn": TERMS["param_l2"], "weight": 0.01}],
        "grad_transforms": [{"params": ["head.*"], "fn": helpers.halve_gradient}],
    }
    metric = {"name": METRICS["mae"], "higher_is_better": False}
    cfg, _, _ = prepare(
        base_config(members=[member], evaluation={"metrics": [metric]}, couplings=[{"type": Separation, "param": "body.weight", "margin": 1.0}])
    )
    first = cfg.members[0]
    assert first.model.given is helpers.TinyNet and first.model.name == "tests.helpers:TinyNet"
    shared = {id(m.data.given) for m in cfg.members}  # (base_config copied the dataset once)
    assert len(shared) == 1 and torch.equal(first.data.given.tensors[0], dataset.tensors[0]), "one dataset, not one per member"
    assert resolve_loss(first) is LOSSES["mse"] and resolve_terms(first) == {"l2": TERMS["param_l2"]} and optimizer_class(first) is torch.optim.SGD
    assert resolve_grad_transforms(first, ["body.weight", "head.weight"])[0][1] is helpers.halve_gradient
    assert resolve_metrics(cfg.evaluation, None) == {"mae": METRICS["mae"]}
    assert (cfg.couplings[0].type, cfg.couplings[0].label, cfg.couplings[0].given) == ("poptrain.couplings.separation:Separation", "separation", Separation)


# -- what cannot travel is refused before anything starts -------------------------------------------


def refusal(base_config, **member) -> str:
    from tests.conftest import prelu_member

    with pytest.raises(ConfigError) as caught:
        prepare(base_config(members=[prelu_member("m1", **member), prelu_member("m2")]))
    return " ".join(caught.value.render().split())


def test_an_object_holding_an_open_file_is_refused_with_what_to_do(base_config, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        message = refusal(base_config, loss=lambda outputs, targets: print(file=log) or torch.nn.functional.mse_loss(outputs, targets))
    assert (
        "members.0.loss: `tests.test_python_objects:test_an_object_holding_an_open_file_is_refused_with_what_to_do.<locals>.<lambda>` "
        "cannot be sent to Ray's workers: pickling it (cloudpickle, as Ray does) fails with PicklingError: Cannot pickle files that are not opened for reading"
        in message
    )
    assert "create it inside the function" in message


def test_a_dataset_too_large_to_ship_is_refused_with_what_to_do(base_config, monkeypatch):
    monkeypatch.setattr(objects, "MAX_SHIPPED_BYTES", 2**20)  # the rule, at a size a test can afford
    large = TensorDataset(torch.zeros(300_000, 1), torch.zeros(300_000, 1))  # 2.3 MiB
    message = refusal(base_config, data={"name": large})
    assert "members.0.data: `torch.utils.data.dataset:TensorDataset` is 2 MiB pickled, more than the 1 MiB a run sends to each of its workers" in message
    assert "give a function that builds or reads the dataset" in message
