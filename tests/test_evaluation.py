"""Held-out evaluation: deterministic splits, the metrics, population summaries and the ensemble
(no Ray), evaluation that never changes training, and a real run whose MLflow view answers which
member is best (against a real MLflow store)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.builtins.data import digits, synthetic_regression
from poptrain.builtins.metrics import accuracy, mae, mse, top_k_accuracy
from poptrain.config import ConfigError, load_config
from poptrain.evaluation.board import EvalBoard
from poptrain.tracking.models import using_tracking_uri
from tests.conftest import digits_member
from tests.in_process import InProcessPopulation

STEPS, EVERY = 12, 5


def held_out_member(name: str, view: str = "full") -> dict:
    """A digits classifier with dropout (its steps draw at random) trained on the training split: the held-out images are its own to evaluate on."""
    return digits_member(name, view, model_kwargs={"dropout": 0.2}, data_kwargs={"split": "train"})


def evaluated(base_config, **changes) -> dict:
    """Seed 003's three views of the digits, evaluated on the held-out images."""
    members = [held_out_member("m1"), held_out_member("m2", "downsampled"), held_out_member("m3", "crop")]
    settings = {
        "members": members,
        "couplings": [],
        "evaluation": {"every": EVERY, "metrics": ["accuracy", "loss", {"name": "top_k_accuracy", "kwargs": {"k": 3}}]},
    }
    settings.update(changes)
    return base_config(**settings)


def test_built_in_datasets_split_into_the_same_disjoint_held_out_samples_in_every_view():
    train, test = digits(split="train"), digits(split="test")
    assert len(train) + len(test) == len(digits()) and len(test) == round(0.2 * len(digits()))
    everything = digits().tensors[0]
    rows = lambda part: {tuple(r.tolist()) for r in part.tensors[0]}  # noqa: E731
    assert not rows(train) & rows(test) and rows(train) | rows(test) == {tuple(r.tolist()) for r in everything}
    assert torch.equal(digits(view="crop", split="test").tensors[1], test.tensors[1]), "views of the same held-out images"
    assert torch.equal(digits(split="test").tensors[0], test.tensors[0]), "deterministic"
    assert len(synthetic_regression(n=100, split="test")) == 20


def test_metrics_on_a_whole_held_out_set():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, targets) == 0.5
    assert top_k_accuracy(logits, targets, k=2) == 1.0
    assert mse(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])) == 2.5
    assert mae(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.5


def test_the_population_summary_names_the_best_member_and_scores_the_ensemble_of_members_on_the_same_samples(base_config):
    board = EvalBoard(load_config(evaluated(base_config)))
    targets = np.array([0, 1, 2, 1])
    right = np.eye(3)[targets] * 4.0  # confident and right on every sample
    half = right.copy()
    half[2:] = np.eye(3)[[0, 0]] * 4.0  # right on half
    assert board.arrive(5, "m1", {"eval/accuracy": 1.0}, right.astype(np.float32), targets) is None
    assert board.arrive(5, "m2", {"eval/accuracy": 0.5}, half.astype(np.float32), targets) is None
    summary, best = board.summarize(board.arrive(5, "m3", {"eval/accuracy": 0.5}, half.astype(np.float32), targets))
    assert summary["eval/accuracy/min"] == 0.5 and summary["eval/accuracy/median"] == 0.5 and summary["eval/accuracy/max"] == 1.0
    assert summary["best/eval/accuracy"] == 1.0 and best == ("m1", 1.0)
    assert summary["ensemble/members"] == 3 and summary["ensemble/accuracy"] == 0.5, "the mean of probabilities, two against one"
    assert board.arrive(5, "m2", {"eval/accuracy": 0.9}, half, targets) is None, "a restarted member reporting again changes nothing"


def test_members_on_different_samples_have_no_ensemble(base_config):
    board = EvalBoard(load_config(evaluated(base_config)))
    outputs = np.zeros((4, 3), dtype=np.float32)
    board.arrive(5, "m1", {"eval/accuracy": 1.0}, outputs, np.array([0, 1, 2, 1]))
    board.arrive(5, "m2", {"eval/accuracy": 1.0}, outputs, np.array([1, 1, 2, 1]))
    summary, _ = board.summarize(board.arrive(5, "m3", {"eval/accuracy": 1.0}, outputs, np.array([2, 1, 2, 1])))
    assert not any(k.startswith("ensemble/") for k in summary)


def test_evaluating_never_changes_what_a_member_trains(base_config):
    """Evaluation runs in eval mode, without gradients, on random streams of its own: with dropout,
    a member evaluated after every step ends bitwise where one never evaluated does."""
    config = evaluated(base_config)

    def train(evaluate: bool) -> dict[str, torch.Tensor]:
        trainer = InProcessPopulation({**config, "members": config["members"][:1]}).trainers["m1"]
        for _ in range(4):
            trainer.train_step()
            if evaluate:
                metrics, outputs, targets = trainer.evaluate()
                assert set(metrics) == {"eval/accuracy", "eval/loss", "eval/top_3_accuracy"}
                assert outputs.shape == (len(targets), 10) and trainer.model.training
        return trainer.weights()

    plain, evaluated_every_step = train(False), train(True)
    assert all(torch.equal(plain[k], evaluated_every_step[k]) for k in plain)


def test_a_ranking_metric_of_unknown_direction_is_refused(base_config):
    with pytest.raises(ConfigError, match="higher_is_better"):
        load_config(evaluated(base_config, evaluation={"metrics": ["tests.helpers:squared_loss_gap"]}))


PAPA = [{"type": "average", "rate": 0.5}]


def averaged_members(base_config, setting, couplings, dropouts=(0.2, 0.2), first_data=None) -> list[str] | None:
    """Whose final weights make the population's average model, as `poptrain check` and the driver decide it."""
    from poptrain.couplings import build_couplings
    from poptrain.driver.checks import inspect_population
    from poptrain.evaluation import population_average

    members = [held_out_member(f"m{i + 1}") for i in range(2)]
    for member, dropout in zip(members, dropouts, strict=True):
        member["model"]["kwargs"]["dropout"] = dropout
    if first_data is not None:
        members[0]["data"] = first_data
    cfg = load_config(base_config(members=members, couplings=couplings, evaluation={"population_average": setting}))
    return population_average.averaged_members(cfg, build_couplings(cfg.couplings, inspect_population(cfg)))


@pytest.mark.parametrize(
    "setting, couplings, dropouts, expected",
    [
        ("auto", PAPA, (0.2, 0.2), ["m1", "m2"]),  # averaged members of one model
        ("auto", [], (0.2, 0.2), None),  # nothing averages them
        ("auto", PAPA, (0.2, 0.3), None),  # the same shapes, but not one model: its mean is no model
        (False, PAPA, (0.2, 0.2), None),
        (True, [], (0.2, 0.2), ["m1", "m2"]),  # asked for: every member
    ],
)
def test_the_population_average_is_of_the_averaged_members_of_one_model_unless_asked_otherwise(base_config, setting, couplings, dropouts, expected):
    assert averaged_members(base_config, setting, couplings, dropouts) == expected


def test_a_population_average_asked_for_where_the_mean_is_no_model_is_refused_before_anything_starts(base_config):
    with pytest.raises(ConfigError, match=r"evaluation\.population_average.*not of one architecture"):
        averaged_members(base_config, True, PAPA, (0.2, 0.3))
    no_held_out = {"name": "digits", "kwargs": {"view": "full"}, "batch_size": 32}  # all the digits: nothing held out
    with pytest.raises(ConfigError, match=r"evaluation\.population_average.*'m1', whose held-out data the average is evaluated on, has none"):
        averaged_members(base_config, True, PAPA, first_data=no_held_out)


@pytest.fixture(scope="module")
def evaluated_run(ray_session, tmp_path_factory, tracking_uri):
    """One real run of seed 003's three views, evaluated every 5 steps, with logged models."""
    from tests.conftest import make_config

    config = make_config(tmp_path_factory.mktemp("evaluated"), tracking_uri, "evaluated", name="evaluated", steps=STEPS)
    config = {**config, "members": evaluated(lambda **c: c)["members"], "couplings": [], "evaluation": evaluated(lambda **c: c)["evaluation"]}
    config["tracking"]["log_models"] = True
    return poptrain.run(config)


def test_every_member_logs_its_held_out_metrics_at_every_evaluation_and_at_the_end(evaluated_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    for name, run_id in evaluated_run.member_run_ids.items():
        steps = [m.step for m in client.get_metric_history(run_id, "eval/accuracy")]
        assert sorted(steps) == [5, 10, STEPS], name
        assert 0.0 <= evaluated_run.metrics[name]["eval/accuracy"] <= 1.0


def test_the_parent_run_shows_the_population_the_best_member_and_the_ensemble(evaluated_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    parent = client.get_run(evaluated_run.run_id)
    for key in ("eval/accuracy/min", "eval/accuracy/median", "eval/accuracy/max", "best/eval/accuracy", "ensemble/accuracy", "ensemble/loss"):
        assert [m.step for m in client.get_metric_history(evaluated_run.run_id, key)] == [5, 10, STEPS], key
    finals = {name: evaluated_run.metrics[name]["eval/accuracy"] for name in evaluated_run.member_run_ids}
    assert parent.data.tags["poptrain.best_member"] == evaluated_run.best_member == max(finals, key=finals.get)
    assert parent.data.metrics["best/eval/accuracy"] == max(finals.values())


def test_the_mlflow_view_opens_on_training_runs_with_hyperparameters_datasets_and_ranked_models(evaluated_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    parent = client.get_run(evaluated_run.run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    member = client.get_run(evaluated_run.member_run_ids["m2"])
    assert not any(k.startswith("placement.") for k in member.data.params), "process facts are not hyperparameters"
    assert member.data.tags["poptrain.placement.device"] == "cpu"
    inputs = {i.tags[0].value if i.tags else None: i.dataset for i in member.inputs.dataset_inputs}
    assert set(inputs) >= {"train", "eval"} and inputs["eval"].name == "digits"
    assert '"split": "test"' in inputs["eval"].profile and '"view": "downsampled"' in inputs["eval"].profile
    with using_tracking_uri(tracking_uri):
        models = mlflow.search_logged_models(
            experiment_ids=[parent.info.experiment_id], order_by=[{"field_name": "metrics.eval/accuracy", "ascending": False}], output_format="list"
        )
    ours = [m for m in models if m.source_run_id in evaluated_run.member_run_ids.values()]
    ranked = [m.tags["poptrain.member"] for m in ours]
    finals = {name: evaluated_run.metrics[name]["eval/accuracy"] for name in evaluated_run.member_run_ids}
    assert ranked[0] == evaluated_run.best_member and sorted(finals, key=finals.get, reverse=True) == ranked
