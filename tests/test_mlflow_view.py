"""What a population looks like in MLflow (issue 16): the UI opens on the training view, each
member run shows where it ran (tags) and on which data (dataset inputs), its model ranks among the
population's by held-out metric, the plots and tables show held-out curves with the ensemble and
the best member. Driven through :class:`Tracking` directly against a real sqlite store: no Ray."""

from __future__ import annotations

import json
import logging
import sys
import time
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from poptrain.cli import compare_main, print_summary
from poptrain.components.build import build_model
from poptrain.config import Component, load_config
from poptrain.tracking import models as models_logging
from poptrain.tracking.compare import compare_table
from poptrain.tracking.runs import Tracking
from tests.conftest import make_config, prelu_member

ACCURACY = {"m1": 0.70, "m2": 0.90, "m3": 0.80}  # each member's final held-out accuracy


def datasets_of(name: str) -> list[dict]:
    """A member's datasets as the driver describes them: its training view and the shared held-out split."""
    return [
        {
            "name": f"digits-{name}",
            "digest": f"train{name}",
            "context": "train",
            "source": "poptrain.builtins:digits",
            "profile": {"rows": 1437, "split": "train"},
        },
        {"name": "digits-test", "digest": "d1g1t5te", "context": "eval", "source": "poptrain.builtins:digits", "profile": {"rows": 360, "split": "test"}},
    ]


@pytest.fixture
def population(tmp_path, tracking_uri, experiment):
    """Runs of a three-member population created by Tracking; each member logged a training loss and
    held-out accuracy at steps 5 and 10 (its final value), its placement and its datasets; the
    parent the population's eval statistics, best and ensemble. Yields ``(tracking, cfg)``."""
    members = [prelu_member(name) for name in ACCURACY]
    cfg = load_config(make_config(tmp_path / "runs", tracking_uri, experiment, members=members, steps=10))
    tracking = Tracking(tracking_uri)
    tracking.create_runs(cfg)
    now = int(time.time() * 1000)
    for index, (name, accuracy) in enumerate(ACCURACY.items()):
        items = [("loss", 1.0 / (step + 1), step, now) for step in range(10)]
        tracking.log_member(name, items + [("eval/accuracy", accuracy - 0.2, 5, now), ("eval/accuracy", accuracy, 10, now + 1)])
        tracking.log_placement(name, {"pid": 4000 + index, "node_id": "n0", "hostname": "h", "device": "cpu", "torch_threads": 1})
        tracking.log_datasets(name, datasets_of(name))
    for step, scale in ((5, 0.8), (10, 1.0)):
        values = {"eval/accuracy/min": 0.7, "eval/accuracy/median": 0.8, "eval/accuracy/max": 0.9, "best/eval/accuracy": 0.9, "ensemble/accuracy": 0.95}
        tracking.log_population([(key, value * scale, step, now + step) for key, value in values.items()])
    tracking.set_tags(None, {"poptrain.best_member": "m2", "poptrain.best_by": "eval/accuracy"})
    tracking.flush()
    yield tracking, cfg
    tracking.close()


def log_models(tracking, cfg, tmp_path, metrics_of):
    """Log every member's model (its untrained weights: only the metrics matter here)."""
    spec = cfg.member("m1").model.model_dump(mode="json")
    torch.save(build_model(Component(**spec)).state_dict(), tmp_path / "model.pt")
    for name in ACCURACY:
        tracking.log_model(name, str(tmp_path / "model.pt"), spec, torch.randn(4, 20), cfg.steps - 1, metrics=metrics_of(name))


def test_the_mlflow_ui_opens_a_population_experiment_on_its_training_view(tracking_uri, tmp_path, experiment):
    tracking = Tracking(tracking_uri)
    try:
        ids = tracking.create_runs(load_config(make_config(tmp_path, tracking_uri, experiment)))
        assert tracking.client.get_experiment(ids.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

        # An experiment created before (without the tag) gets it; a kind a user chose is kept.
        client = MlflowClient(tracking_uri)
        client.create_experiment(f"{experiment}-old")
        chosen = client.create_experiment(f"{experiment}-chosen", tags={"mlflow.experimentKind": "genai_development"})
        old = tracking.create_runs(load_config(make_config(tmp_path, tracking_uri, f"{experiment}-old"))).experiment_id
        tracking.create_runs(load_config(make_config(tmp_path, tracking_uri, f"{experiment}-chosen")))
        assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
        assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    finally:
        tracking.close()


def test_where_a_member_ran_is_tags_that_follow_a_restart_and_stay_out_of_params(population):
    tracking, _ = population
    tracking.log_placement("m1", {"pid": 5000, "device": "cpu"})  # its process restarted
    run = tracking.client.get_run(tracking.ids.members["m1"])
    assert run.data.tags["poptrain.placement.pid"] == "5000" and run.data.tags["poptrain.placement.node_id"] == "n0"
    assert not [key for key in run.data.params if "placement" in key], "the Compare page's params stay hyperparameters"

    # `poptrain compare --all` still shows where each member ran; without --all pids stay out.
    rows = compare_table(tracking.client, tracking.ids.parent, all_params=True)[1]
    placement = {key: values for kind, key, *values in rows if kind == "placement"}
    assert placement["placement.pid"] == ["5000", "4001", "4002"]
    assert not [row for row in compare_table(tracking.client, tracking.ids.parent)[1] if row[0] == "placement"]


def test_each_member_run_lists_its_training_and_held_out_datasets(population):
    tracking, _ = population
    for name in ACCURACY:
        inputs = tracking.client.get_run(tracking.ids.members[name]).inputs.dataset_inputs
        by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
        assert sorted(by_context) == ["eval", "train"]
        assert (by_context["train"].name, by_context["train"].digest) == (f"digits-{name}", f"train{name}")
        assert json.loads(by_context["eval"].profile) == {"rows": 360, "split": "test"}
        assert mlflow.data.get_source(by_context["eval"]).to_dict() == {"tags": {"poptrain.source": "poptrain.builtins:digits"}}
    tracking.log_datasets("m1", datasets_of("m1"))  # a resumed run logs them again
    assert len(tracking.client.get_run(tracking.ids.members["m1"]).inputs.dataset_inputs) == 2


def test_the_population_models_rank_best_first_by_held_out_accuracy(population, tmp_path, tracking_uri):
    tracking, cfg = population
    log_models(tracking, cfg, tmp_path, lambda name: {"eval/accuracy": ACCURACY[name]} if name != "m3" else None)  # m3: the run's own

    ranking = [{"field_name": "metrics.eval/accuracy", "ascending": False}]
    with_tracking_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        models = mlflow.search_logged_models(experiment_ids=[tracking.ids.experiment_id], order_by=ranking, output_format="list")
    finally:
        mlflow.set_tracking_uri(with_tracking_uri)
    assert [m.tags["poptrain.member"] for m in models] == ["m2", "m3", "m1"]
    for model in models:
        (metric,) = model.metrics
        assert (metric.key, metric.value) == ("eval/accuracy", ACCURACY[model.tags["poptrain.member"]])
        assert (metric.dataset_name, metric.dataset_digest) == ("digits-test", "d1g1t5te"), "measured on the held-out set"

    # One population's models apart from others in the experiment; the runs' histories unchanged.
    mine = tracking.client.search_logged_models(
        [tracking.ids.experiment_id], filter_string=f"tags.`poptrain.population_run` = '{tracking.ids.parent}'", order_by=ranking
    )
    assert [m.tags["poptrain.member"] for m in mine] == ["m2", "m3", "m1"]
    for name in ACCURACY:
        history = tracking.client.get_metric_history(tracking.ids.members[name], "eval/accuracy")
        assert sorted(m.step for m in history) == [5, 10], "each evaluation once"


def test_pickled_models_are_explained_once_in_poptrains_log_not_warned_about_at_every_member(population, tmp_path, monkeypatch):
    """MLflow warns at every pickled model that unpickling runs code: poptrain says once, in its own
    log, why it pickles and what loading one trusts, and MLflow's warning is not repeated per member."""
    tracking, cfg = population
    monkeypatch.setattr(models_logging, "_said", [])  # as in a fresh process
    seen: list[tuple[str, str]] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append((record.name, record.getMessage()))  # type: ignore[method-assign]
    loggers = [logging.getLogger("mlflow.pytorch"), logging.getLogger(models_logging.__name__)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        log_models(tracking, cfg, tmp_path, lambda name: None)  # three members
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    about_pickle = [name for name, message in seen if "pickle" in message.lower()]
    assert about_pickle == [models_logging.__name__], seen


def test_plots_show_held_out_curves_with_the_ensemble_and_the_best_member(population, tmp_path):
    tracking, _ = population
    paths = tracking.log_plots(str(tmp_path / "plots"))
    assert str(tmp_path / "plots" / "eval.png") in paths
    with Image.open(tmp_path / "plots" / "eval.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert "plots/eval.png" in [a.path for a in tracking.client.list_artifacts(tracking.ids.parent, "plots")]


def test_compare_and_the_final_summary_show_held_out_metrics_the_best_member_and_the_ensemble(population, tracking_uri, capsys):
    tracking, _ = population
    columns, rows = compare_table(tracking.client, tracking.ids.parent)
    metrics = [(key, values) for kind, key, *values in rows if kind == "metric"]
    assert metrics[0] == ("eval/accuracy", [0.7, 0.9, 0.8]), "held-out metrics come first"

    assert compare_main([tracking.ids.parent, "--tracking-uri", tracking_uri]) == 0
    shown = capsys.readouterr().out
    assert "m2 (best)" in shown and "ensemble/accuracy" in shown and "0.95" in shown and "best/eval/accuracy" in shown
    assert "eval/accuracy/median" in shown and "best member (by eval/accuracy)" in shown
    experiment = tracking.client.get_run(tracking.ids.parent).info.experiment_id
    view = f"#/experiments/{experiment}/runs/{tracking.ids.parent}?workflowType=machine_learning"  # the training view, not MLflow 3's GenAI default
    assert f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000/{view}" in shown

    ids = tracking.ids
    result = SimpleNamespace(  # what poptrain.run returns, as far as the summary reads it
        run_id=ids.parent,
        member_run_ids=ids.members,
        tracking_uri=tracking_uri,
        output_dir="runs/pop",
        seconds=1.0,
        metrics={name: {"loss": 0.1, "objective": 0.1} for name in ACCURACY},
        placement={name: {"device": "cpu"} for name in ACCURACY},
    )
    print_summary(result)
    summary = capsys.readouterr().out
    assert "eval/accuracy" in summary and "m2 (best)" in summary and "ensemble/accuracy" in summary and "0.9" in summary
    assert view in summary


def test_progress_counts_training_steps_not_evaluations_nor_ensemble_values(population):
    tracking, cfg = population
    progress = tracking.progress()
    assert progress["m1"]["step"] == cfg.steps, "the evaluation after the last step is not one more step"
    assert progress["m1"]["eval/accuracy"] == 0.7
    assert "accuracy" not in progress.get("__couplings__", {}), "ensemble/accuracy is not a coupling"


def client_metrics(uri, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).data.metrics


def test_the_parent_run_summarises_every_member_metric_once_every_member_has_logged_the_step(tracking_uri, experiment, tmp_path):
    """population/<key>/min|median|max at every logged step: a large population at a glance."""
    from mlflow.tracking import MlflowClient

    from poptrain.config import load_config
    from poptrain.tracking.runs import Tracking
    from tests.conftest import make_config, prelu_member

    cfg = load_config(make_config(tmp_path, tracking_uri, experiment, members=[prelu_member(f"m{i}") for i in range(3)]))
    tracking = Tracking(tracking_uri)
    ids = tracking.create_runs(cfg)
    tracking.log_member("m0", [("loss", 1.0, 0, 1), ("loss", 0.5, 1, 2)])
    tracking.log_member("m1", [("loss", 3.0, 0, 1), ("loss", 1.5, 1, 2), ("term/w", 7.0, 1, 2)])
    assert 0 in tracking.step_values and not client_metrics(tracking_uri, ids.parent), "step 0 waits for m2"
    tracking.log_member("m2", [("loss", 2.0, 0, 1), ("eval/accuracy", 0.9, 1, 2)])  # m2 has logged step 0 only
    tracking.log_member("m2", [("loss", 2.5, 1, 2)])
    tracking.finish("FINISHED")
    client = MlflowClient(tracking_uri)
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(ids.parent, key)]  # noqa: E731
    assert history("population/loss/min") == [(0, 1.0), (1, 0.5)]
    assert history("population/loss/median") == [(0, 2.0), (1, 1.5)]
    assert history("population/loss/max") == [(0, 3.0), (1, 2.5)]
    assert history("population/term/w/max") == [(1, 7.0)], "a metric some members log is summarised over those"
    assert not history("population/eval/accuracy/min"), "held-out metrics are the coordinator's (eval/<m>/min ...)"


def test_the_terminal_summarises_a_large_population_instead_of_printing_a_line_per_member(capsys):
    from poptrain.cli import LISTED_MEMBERS, PlainDisplay, display_rows

    def snapshot(n):
        members = {f"m{i}": {"step": 10 + i, "loss": 1.0 / (i + 1), "steps_per_s": 2.0, "eta_s": 100.0 - i} for i in range(n)}
        return {"members": members, "couplings": {"separation": 0.5}, "steps": 100, "elapsed_s": 3.0}

    assert [label for label, _ in display_rows(snapshot(LISTED_MEMBERS))] == [f"m{i}" for i in range(LISTED_MEMBERS)]
    rows = dict(display_rows(snapshot(1000)))
    assert list(rows) == ["median of 1000", "best m999", "worst m0", "slowest m0"]
    assert rows["median of 1000"]["step"] == 510 and rows["median of 1000"]["eta_s"] == 100.0
    with PlainDisplay("big", every_s=0) as display:
        display.update(snapshot(1000))
    line = capsys.readouterr().out.splitlines()[-1]
    assert "median of 1000 step 510/100" in line and line.count("|") == 4, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_the_drivers_mlflow_writer_shares_the_cpu_with_the_hosts_instead_of_preempting_them(tracking_uri):
    """Ray starts the members' hosts at niceness 15; the driver's writer thread runs at it too (at
    the driver's 0 it would take nearly a whole core from them whenever it writes), while the
    driver's other threads keep theirs."""
    import os
    import threading

    from poptrain.tracking.runs import WORKER_NICENESS

    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = max(WORKER_NICENESS, caller)  # a driver already running nicer (a niced test run) stays as nice
    tracking = Tracking(tracking_uri)
    try:
        writer = tracking._writer
        deadline = time.monotonic() + 5
        while os.getpriority(os.PRIO_PROCESS, writer.native_id) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == expected
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller, "the caller's thread keeps its own"
    finally:
        tracking.close()
