"""Seeing a population (issue 4) against a real `mlflow server` over HTTP: plots as artifacts,
the member comparison, and logged models that load back and predict like the saved weights."""

from __future__ import annotations

from pathlib import Path

import mlflow.pytorch
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from PIL import Image

import poptrain
from poptrain.cli import compare_main
from poptrain.components.build import build_model
from poptrain.config import Component
from poptrain.tracking.compare import compare_table
from poptrain.tracking.models import log_member_model, using_tracking_uri
from poptrain.tracking.plots import write_plots
from tests.conftest import prelu_member

PLOTS = {"losses.png", "terms_m1.png", "terms_m2.png", "couplings.png", "coupled_separation.png"}


def test_a_population_over_http_has_plots_a_comparison_and_loadable_models(ray_session, base_config, mlflow_server, tmp_path, capsys):
    m1 = prelu_member("m1", terms=[{"name": "l2", "fn": {"name": "param_l2", "kwargs": {"params": "activation.weight"}}, "weight": 0.01}])
    m2 = prelu_member("m2", optimizer={"name": "adam", "lr": 0.02})
    # The defaults a user gets: plots and logged models on (the shared fixture turns them off for speed).
    tracking = {"uri": mlflow_server, "experiment": "x", "plots": True, "log_models": True}
    config = base_config(tracking=tracking, steps=12, members=[m1, m2])
    result = poptrain.run(config)
    client = MlflowClient(mlflow_server)

    # Plots: artifacts of the parent run, valid PNG images; also under the run's output folder.
    artifacts = {a.path.split("/")[-1]: a for a in client.list_artifacts(result.run_id, "plots")}
    assert PLOTS <= set(artifacts), sorted(artifacts)
    for name in PLOTS:
        assert artifacts[name].file_size > 0
        local = Path(client.download_artifacts(result.run_id, f"plots/{name}", str(tmp_path)))
        with Image.open(local) as image:
            image.verify()
        with Image.open(local) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert (result.output_dir / "plots" / name).is_file()

    # Comparison: what differs between members, then their final key metrics.
    columns, rows = compare_table(client, result.run_id)
    assert columns == ["kind", "key", "m1", "m2"]
    params = {key: values for kind, key, *values in rows if kind == "param"}
    metrics = {key: values for kind, key, *values in rows if kind == "metric"}
    assert params["optimizer.lr"] == ["0.01", "0.02"]
    assert params["terms.0.name"] == ["l2", None]
    assert "model.kwargs.activation" not in params and "placement.pid" not in params and "member" not in params
    assert {"loss", "objective", "coupling/separation", "term/l2"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics["loss"]) and metrics["term/l2"][1] is None
    every = {(kind, key) for kind, key, *_ in compare_table(client, result.run_id, all_params=True)[1]}
    assert {("param", "model.kwargs.activation"), ("param", "optimizer.lr"), ("placement", "placement.pid")} <= every
    assert compare_main([result.run_id, "--tracking-uri", mlflow_server]) == 0
    shown = capsys.readouterr().out
    assert "optimizer.lr" in shown and "0.02" in shown and "coupling/separation" in shown
    experiment = client.get_run(result.run_id).info.experiment_id
    assert f"{mlflow_server}/#/experiments/{experiment}/runs/{result.run_id}?workflowType=machine_learning" in shown, "a server's link opens as it is"

    # Models: one LoggedModel per member run, linked to it, loading back as the member's own
    # module and predicting like its saved weights.
    experiment_id = client.get_run(result.run_id).info.experiment_id
    inputs = torch.randn(7, 20)  # another batch size than the example's
    for name, run_id in result.member_run_ids.items():
        models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
        assert len(models) == 1, f"{name}: {models}"
        assert models[0].status == LoggedModelStatus.READY and models[0].name == "model"
        assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [models[0].model_id]
        saved = torch.load(result.output_dir / "members" / name / "model.pt", weights_only=True)
        spec = next(m["model"] for m in config["members"] if m["name"] == name)
        reference = build_model(Component(**spec))
        reference.load_state_dict(saved)
        with using_tracking_uri(mlflow_server):  # models:/ and runs:/ URIs resolve through MLflow's global URI
            loaded = mlflow.pytorch.load_model(models[0].model_uri)
            by_run = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        assert torch.equal(loaded.activation.weight, saved["activation.weight"]), "the member's alpha, by name"
        with torch.no_grad():
            torch.testing.assert_close(loaded(inputs), reference(inputs))
            torch.testing.assert_close(by_run(inputs), reference(inputs))


def test_compare_refuses_unknown_runs_and_runs_that_are_not_a_population(mlflow_server, tmp_path, capsys):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("not-populations")
    plain = client.create_run(experiment_id, run_name="plain").info.run_id
    parent = client.create_run(experiment_id, run_name="pop", tags={"poptrain.role": "population", "poptrain.members": "a"}).info.run_id
    member = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "poptrain.role": "member", "poptrain.member": "a"}).info.run_id

    assert compare_main(["0123456789abcdef0123456789abcdef", "--tracking-uri", mlflow_server]) == 2
    assert "no MLflow run" in capsys.readouterr().err
    assert compare_main([plain, "--tracking-uri", mlflow_server]) == 2
    assert "not a poptrain population" in capsys.readouterr().err
    assert compare_main([member, "--tracking-uri", mlflow_server]) == 2
    assert parent in capsys.readouterr().err, "points at the population's run id"

    # A population that logged nothing yet: no chart to draw, a table with no metric.
    assert write_plots(client, parent, tmp_path / "plots") == []
    columns, rows = compare_table(client, parent)
    assert columns == ["kind", "key", "a"] and not [r for r in rows if r[0] == "metric"]


def test_a_model_of_several_inputs_is_logged_without_an_example_and_loads_back(tracking_uri, tmp_path):
    # A member's example_inputs is None when its data has several inputs: such a model used to
    # fail the run after training, at logging.
    from tests.helpers import TwoInputNet

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment(f"two-inputs-{tmp_path.name}")).info.run_id
    model = TwoInputNet()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    info = log_member_model(client, run_id, str(tmp_path / "model.pt"), {"name": "tests.helpers:TwoInputNet"}, None)
    with using_tracking_uri(tracking_uri):
        loaded = mlflow.pytorch.load_model(info.model_uri)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), model(a, b))


def test_a_large_populations_figures_are_the_same_whether_its_members_are_read_or_named(new_store, tmp_path):
    """Over MEMBERS_PLOTTED_ONE_BY_ONE members, the figures come from the parent run's summaries:
    the driver names the members instead of reading their runs back, and draws the same figures."""
    from poptrain.tracking.plots import MEMBERS_PLOTTED_ONE_BY_ONE
    from poptrain.tracking.writers import writer_for

    client = MlflowClient(new_store("large"))
    writer = writer_for(client)
    names = [f"m{i}" for i in range(MEMBERS_PLOTTED_ONE_BY_ONE + 2)]
    (parent,) = writer.create_runs(client.create_experiment("large"), [("pop", {"poptrain.role": "population", "poptrain.members": ",".join(names)})])
    member_tags = {"mlflow.parentRunId": parent, "poptrain.role": "member"}
    writer.create_runs(client.get_run(parent).info.experiment_id, [(n, {**member_tags, "poptrain.member": n}) for n in names])
    spread = (("min", 1.0), ("median", 2.0), ("max", 3.0))
    summaries = [(f"population/loss/{s}", v / (1 + step), step, 1000 + step) for step in range(0, 30, 10) for s, v in spread]
    coupling = [("coupling/separation", 0.1 / (1 + step), step, 1000 + step) for step in range(0, 30, 10)]
    writer.log_metrics({parent: summaries + coupling})

    read = write_plots(client, parent, tmp_path / "read")
    named = write_plots(client, parent, tmp_path / "named", member_names=names)
    assert [p.name for p in read] == [p.name for p in named] and {"population.png", "couplings.png"} <= {p.name for p in named}
