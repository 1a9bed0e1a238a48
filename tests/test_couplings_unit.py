"""Coupling maths on plain tensors: no Ray, milliseconds."""

from __future__ import annotations

import math

import pytest
import torch

from poptrain.config import load_config
from poptrain.coordinator.coordinator import CouplingEvaluator
from poptrain.couplings import Coupling, Quantity, build_couplings
from poptrain.driver.checks import inspect_population
from poptrain.exchange.wire import ExchangePlan
from tests.conftest import digits_member, prelu_member


def couplings_for(base_config, couplings, members=None):
    cfg = load_config(base_config(couplings=couplings, **({"members": members} if members else {})))
    population = inspect_population(cfg)
    return cfg, population, build_couplings(cfg.couplings, population)


def slopes(**values):
    return {Quantity(m, "param", "activation.weight"): torch.tensor([v]) for m, v in values.items()}


@pytest.mark.parametrize(
    "settings, a, b, expected",
    [
        ({"margin": 2.0}, 0.5, 1.0, 1.5),  # seed 000: relu(2 - |a - b|)
        ({"margin": 2.0}, -1.0, 1.5, 0.0),  # far enough apart: no penalty
        ({"margin": 2.0, "weight": 3.0}, 0.0, 0.0, 2.0),  # value is before weight
        ({"margin": 1.0, "norm": "l2"}, 0.0, 0.6, 0.4),
    ],
)
def test_separation_is_a_hinge_on_the_distance(base_config, settings, a, b, expected):
    _, _, (coupling,) = couplings_for(base_config, [{"type": "separation", "param": "activation.weight", **settings}])
    value = coupling.value(slopes(m1=a, m2=b))
    assert float(value) == pytest.approx(expected)
    assert float(coupling.term("m1", slopes(m1=a, m2=b))) == pytest.approx(expected * settings.get("weight", 1.0))


def test_separation_repulsion_variant_is_the_seed_formula(base_config):
    _, _, (coupling,) = couplings_for(base_config, [{"type": "separation", "param": "activation.weight", "variant": "repulsion"}])
    a, b = torch.tensor([-1.0]), torch.tensor([1.0])
    expected = (a.abs() + b.abs()).sum() + (1 / a.abs() + 1 / b.abs()).sum() - (a - b).abs().sum()
    assert float(coupling.value(slopes(m1=-1.0, m2=1.0))) == pytest.approx(float(expected))


def test_separation_pairs_restrict_which_members_are_kept_apart(base_config):
    members = [prelu_member("a"), prelu_member("b"), prelu_member("c")]
    _, _, (coupling,) = couplings_for(base_config, [{"type": "separation", "param": "activation.weight", "pairs": [["a", "b"]]}], members)
    assert float(coupling.value(slopes(a=0.0, b=0.5, c=0.0))) == pytest.approx(1.5)  # only a-b counts
    assert set(coupling.metrics(0, slopes(a=0.0, b=0.5, c=0.0))) >= {"distance/a-b", "a/activation.weight"}


def test_separation_logs_each_pairs_distance_under_the_pairs_names(base_config):
    members = [prelu_member("a"), prelu_member("b"), prelu_member("c")]
    _, _, (coupling,) = couplings_for(base_config, [{"type": "separation", "param": "activation.weight"}], members)
    with torch.no_grad():  # as the coordinator logs it
        metrics = coupling.metrics(0, slopes(a=0.0, b=0.5, c=2.0))
    assert {k: v for k, v in metrics.items() if k.startswith("distance/")} == {"distance/a-b": 0.5, "distance/a-c": 2.0, "distance/b-c": 1.5}


@pytest.mark.parametrize("settings", [{}, {"norm": "l2"}, {"variant": "repulsion"}])
def test_separation_of_many_members_is_the_sum_over_every_pair_computed_either_way(base_config, monkeypatch, settings):
    """All pairs at once for small parameters, pair by pair (bounded memory) for large ones: the same sum."""
    import poptrain.couplings.separation as separation

    names = ["a", "b", "c", "d"]
    _, _, (coupling,) = couplings_for(
        base_config, [{"type": "separation", "param": "activation.weight", "margin": 2.5, **settings}], [prelu_member(n) for n in names]
    )
    q = slopes(a=0.3, b=-0.9, c=1.4, d=0.35)
    a = {n: q[Quantity(n, "param", "activation.weight")] for n in names}
    if settings.get("variant") == "repulsion":
        pair = lambda x, y: (x.abs() + y.abs()).sum() + (1 / x.abs() + 1 / y.abs()).sum() - (x - y).abs().sum()  # noqa: E731
    else:
        distance = (lambda d: d.abs().sum()) if settings.get("norm", "l1") == "l1" else (lambda d: d.pow(2).sum().sqrt())
        pair = lambda x, y: torch.relu(2.5 - distance(x - y))  # noqa: E731
    expected = sum(float(pair(a[x], a[y])) for i, x in enumerate(names) for y in names[i + 1 :])
    monkeypatch.setattr(separation, "VECTORIZED_PAIRS", 2)
    vectorized = float(coupling.value(q))
    monkeypatch.setattr(separation, "VECTORIZED_ELEMENTS", 0)
    assert float(coupling.value(q)) == pytest.approx(expected) and vectorized == pytest.approx(expected)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_separation_logged_for_a_large_population_summarizes_every_pair_and_follows_changed_values(base_config, norm):
    """The parent run's separation of 40 members (780 pairs): its value, bitwise the sum a member's
    term computes, and the distances' min, median (torch's: the lower middle), max and count within
    the margin over every pair; computed once per round for both, and again for a value changed in
    place or replaced."""
    names = [f"m{i}" for i in range(40)]
    separation = {"type": "separation", "param": "activation.weight", "margin": 0.3, "norm": norm}
    _, _, (coupling,) = couplings_for(base_config, [separation], [prelu_member(n) for n in names])
    generator = torch.Generator().manual_seed(0)
    q = slopes(**{n: float(v) for n, v in zip(names, torch.rand(40, generator=generator), strict=True)})

    def expected():
        values = [q[Quantity(n, "param", "activation.weight")] for n in names]
        distance = (lambda d: d.abs().sum()) if norm == "l1" else (lambda d: d.pow(2).sum().sqrt())  # noqa: E731
        distances = torch.stack([distance(values[i] - values[j]) for i in range(40) for j in range(i + 1, 40)])
        return {
            "distance/min": float(distances.min()),
            "distance/median": float(distances.median()),
            "distance/max": float(distances.max()),
            "pairs_within_margin": float((distances < 0.3).sum()),
        }

    summed = coupling.value(q)  # with autograd on, as a member computes its term: every pair on its own
    with torch.no_grad():
        assert torch.equal(coupling.value(q), summed) and coupling.metrics(0, q) == expected()
        q[Quantity("m7", "param", "activation.weight")].add_(0.25)  # in place
        assert coupling.metrics(0, q) == expected() and torch.equal(coupling.value(q), coupling._penalty(coupling._pair_values(q)))
        q[Quantity("m3", "param", "activation.weight")] = torch.tensor([float("nan")])  # replaced
        assert math.isnan(coupling.metrics(0, q)["distance/median"]) and math.isnan(float(coupling.value(q)))


def test_a_member_sees_its_own_value_live_and_peers_detached(base_config):
    """The gradient a member gets from a coupling is the joint gradient with respect to its own parameters."""
    _, _, (coupling,) = couplings_for(base_config, [{"type": "separation", "param": "activation.weight"}])
    own = torch.tensor([0.5], requires_grad=True)
    q = {Quantity("m1", "param", "activation.weight"): own, Quantity("m2", "param", "activation.weight"): torch.tensor([1.0])}
    coupling.term("m1", q).backward()
    assert float(own.grad) == pytest.approx(1.0)  # d/da relu(2 - |a - b|) at a < b


def test_relative_linear_combination_and_routing(base_config):
    members = [prelu_member("m1"), prelu_member("m2")]
    terms = [{"member": "m1", "coef": 0.5}, {"member": "m2", "coef": -0.5}]
    _, _, (literal, routed) = couplings_for(
        base_config,
        [{"type": "relative", "name": "lit", "terms": terms}, {"type": "relative", "name": "routed", "terms": terms, "trains": ["m1"]}],
        members,
    )
    q = {Quantity("m1", "loss", "loss"): torch.tensor(2.0), Quantity("m2", "loss", "loss"): torch.tensor(1.0)}
    assert float(literal.value(q)) == pytest.approx(0.5)
    assert literal.trains == ["m1", "m2"] and routed.trains == ["m1"]


def test_exchange_plan_sends_only_what_couplings_read(base_config):
    _, population, couplings = couplings_for(
        base_config,
        [{"type": "relative", "terms": [{"member": "m1", "coef": 1.0}, {"member": "m2", "coef": -1.0}], "trains": ["m1"]}],
    )
    plan = ExchangePlan(couplings, population)
    assert plan.sends["m2"]["loss"] == [Quantity("m2", "loss", "loss")]
    assert plan.sends["m1"]["param"] == [] and plan.participants["param"] == []
    assert plan.receives["m1"] == {Quantity("m2", "loss", "loss")} and plan.receives["m2"] == set()


def test_average_back_into_members_leaves_frozen_parameters_alone(base_config):
    members = [prelu_member("m1", frozen=["input.*"]), prelu_member("m2")]
    cfg, population, (average,) = couplings_for(base_config, [{"type": "average", "params": ["input.*", "activation.*"]}], members)
    written = {(q.member, q.key) for rewrite in average.rewrites() for q in rewrite.quantities}
    assert ("m1", "input.weight") not in written and ("m2", "input.weight") in written
    assert ("m1", "activation.weight") in written


def test_average_weights_and_every(base_config):
    members = [prelu_member("m1"), prelu_member("m2")]
    _, _, (average,) = couplings_for(base_config, [{"type": "average", "params": ["activation.*"], "weights": [0.75, 0.25], "every": 3}], members)
    (rewrite,) = average.rewrites()
    assert rewrite.kind == "param" and not rewrite.due(1, final=False) and rewrite.due(3, final=False)
    assert rewrite.due(4, final=True), "always after the last step"
    out = average.rewrite("param", 0, slopes(m1=1.0, m2=3.0), {})
    assert float(out[Quantity("m1", "param", "activation.weight")]) == pytest.approx(1.5)


def test_coordinator_logs_couplings_on_the_whole_population(base_config):
    cfg = load_config(base_config())
    evaluator = CouplingEvaluator(cfg, inspect_population(cfg))
    values = {m: {Quantity(m, "param", "activation.weight"): torch.tensor([v]).numpy()} for m, v in (("m1", 0.25), ("m2", 0.75))}
    reply, _ = evaluator.complete_round("param", 0, values)
    metrics = evaluator.coupling_metrics("param", 0)
    assert metrics["coupling/separation"] == pytest.approx(1.5)
    assert metrics["coupling/separation/distance/m1-m2"] == pytest.approx(0.5)
    assert set(reply.values) == {Quantity("m1", "param", "activation.weight"), Quantity("m2", "param", "activation.weight")}


@pytest.mark.parametrize(
    "coupling, key, words",
    [
        ({"type": "average", "into": "m2"}, "couplings.0.into", "set `trainable: false`"),
        ({"type": "average", "weights": [0.5, 0.6]}, "couplings.0", "sum to 1"),
        ({"type": "share", "params": ["nothing.*"]}, "couplings.0.params", "match no parameter"),
        ({"type": "relative", "terms": [{"member": "m1"}], "fn": {"name": "math:hypot"}}, "couplings.0", "exactly one of"),
        ({"type": "relative", "terms": [{"member": "m1", "term": "ghost"}]}, "couplings.0.terms.0.term", "no term 'ghost'"),
    ],
)
def test_coupling_config_errors_name_the_key(base_config, coupling, key, words):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    with pytest.raises(ConfigError) as info:
        prepare(base_config(couplings=[coupling]))
    assert any(k == key and words in msg for k, msg in info.value.problems), info.value.problems


def test_share_refuses_members_with_different_optimizers(base_config):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    members = [prelu_member("m1"), prelu_member("m2", optimizer={"name": "sgd", "lr": 0.1})]
    with pytest.raises(ConfigError, match="identical `optimizer` settings"):
        prepare(base_config(members=members, couplings=[{"type": "share", "params": ["input.*"]}]))


def test_average_shape_mismatch_names_both_members_and_the_parameter(base_config):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    wide = prelu_member("m2", model={"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "hidden": 41, "activation": "prelu"}})
    with pytest.raises(ConfigError, match=r"parameter 'input.weight' has shape \[40, 20\] in member 'm1' but \[41, 20\] in member 'm2'"):
        prepare(base_config(members=[prelu_member("m1"), wide], couplings=[{"type": "average"}]))


def test_the_readme_example_coupling_works_as_written(base_config):
    import re

    from poptrain.couplings import COUPLINGS
    from tests.conftest import REPO

    page = (REPO / "docs" / "writing-a-coupling.md").read_text(encoding="utf-8")
    code = re.search(r"# Writing a coupling.*?```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(code, "docs/writing-a-coupling.md", "exec"), namespace)
        _, _, (repel,) = couplings_for(base_config, [{"type": "repel", "param": "activation.weight"}])
        own = torch.tensor([0.5], requires_grad=True)
        repel.value({Quantity("m1", "param", "activation.weight"): own, Quantity("m2", "param", "activation.weight"): torch.tensor([0.2])}).backward()
        # d/da exp(-(a - b)^2) = -2 (a - b) exp(-(a - b)^2): pushed apart (at equal values it is exactly 0)
        assert float(own.grad) == pytest.approx(-2 * 0.3 * math.exp(-0.09), rel=1e-6)
    finally:
        COUPLINGS.pop("repel", None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_averaging_divergence_does_not_overflow_in_low_precision(dtype):
    from poptrain.couplings.averaging import average_pass

    n = 300_000  # more than one chunk; in float16 a chunk's sum of 131072 squared gaps of 1 overflows
    values = [torch.zeros(n, dtype=dtype), torch.full((n,), 2.0, dtype=dtype)]
    mean, squares = average_pass(values, None)
    assert mean.dtype == dtype and torch.equal(mean, torch.ones(n, dtype=dtype))
    assert squares == [float(n), float(n)], "each is sqrt(n) from the mean"


def digits_members(second_batch=32, second_classes=10):
    """Two small digits classifiers on the first 64 images; the second's batch size and classes as given."""
    return [
        digits_member("m1", model_kwargs={"num_nodes": 8}, data_kwargs={"limit": 64}),
        digits_member("m2", model_kwargs={"num_nodes": 8, "num_classes": second_classes}, data_kwargs={"limit": 64}, batch_size=second_batch),
    ]


def test_mutual_learning_pulls_each_member_towards_its_peers_fixed_predictions(base_config):
    _, _, (mutual,) = couplings_for(base_config, [{"type": "mutual", "temperature": 2.0}], digits_members())
    own = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    peer = torch.tensor([[0.0, 1.0, 0.0]])
    q = {Quantity("m1", "pred", "outputs"): own, Quantity("m2", "pred", "outputs"): peer}
    reference = own.detach().clone().requires_grad_()
    expected = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(reference / 2, -1), torch.softmax(peer / 2, -1), reduction="batchmean")
    term = mutual.term("m1", q)
    assert torch.allclose(term, expected)
    term.backward()
    expected.backward()
    assert float(reference.grad.abs().sum()) > 0 and torch.allclose(own.grad, reference.grad), "pulled along the reference's gradient"
    assert torch.allclose(mutual.value(q), mutual.value_for("m1", q) + mutual.value_for("m2", q)), "the parent logs the sum"
    assert mutual.metrics(0, q)["agreement"] == 0.0


@pytest.mark.parametrize(
    "members, words",
    [
        (digits_members(second_batch=16), "do not see the same samples in the same order (batch_size 32 vs 16)"),
        (digits_members(second_classes=5), "shapes [10] and [5]"),
    ],
    ids=["misaligned-batches", "different-outputs"],
)
def test_mutual_learning_refuses_members_whose_predictions_cannot_be_compared(base_config, members, words):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    with pytest.raises(ConfigError) as info:
        prepare(base_config(members=members, couplings=[{"type": "mutual"}]))
    assert any(k == "couplings.0.members" and words in msg for k, msg in info.value.problems), info.value.problems


def test_predictions_are_compared_on_the_same_batch_so_async_is_refused(base_config):
    from poptrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"couplings.0.mode: predictions compare members on the same batch"):
        load_config(base_config(members=digits_members(), couplings=[{"type": "mutual"}], exchange={"mode": "async"}))


def test_codistillation_runs_peers_models_without_drawing_from_the_members_random_stream(base_config):
    cfg, population, (mutual,) = couplings_for(base_config, [{"type": "mutual", "mode": "codistillation"}], digits_members())
    population.models = {m.name: m.model.model_dump(mode="json") for m in cfg.members}
    torch.manual_seed(0)
    own = torch.zeros(4, 10, requires_grad=True)
    q = {Quantity("m1", "local", "outputs"): own, Quantity("m1", "local", "inputs"): (torch.rand(4, 64),)}
    q.update({Quantity("m2", "param", n): torch.zeros(shape) for n, shape in population.param_shapes["m2"].items()})
    before = torch.get_rng_state()
    assert float(mutual.term("m1", q).detach()) == pytest.approx(0.0, abs=1e-6), "a zero-weight peer predicts uniformly, as the zero outputs do"
    assert torch.equal(torch.get_rng_state(), before), "building the peer's model draws nothing (resume stays bitwise)"


@pytest.mark.parametrize(
    "old, signature, instead",
    [
        ("exchange_transform", "(self, kind, q, exchange_index, final)", "rewrites_values = True"),
        ("rewrite_at", "(self, kind, step, q, out)", "`rewrite(kind, step, q, out)` takes the step"),
        ("metrics_at", "(self, step, q)", "`metrics(step, q)` takes the step"),
        ("values_for", "(self, members, q)", "values_against(members, own, exchanged)"),
    ],
)
def test_a_coupling_written_for_an_earlier_interface_is_refused_naming_what_replaces_it(base_config, tmp_path, monkeypatch, old, signature, instead):
    """Its method would never be called: the class is refused where it is defined, and a config
    naming it gets the reason under its `type`."""
    from poptrain.config import ConfigError

    module = f"old_style_{old}"
    (tmp_path / f"{module}.py").write_text(
        f"from poptrain.couplings.separation import Separation\n\nclass OldStyle(Separation):\n    def {old}{signature}:\n        return {{}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"couplings.0.type.*defines methods couplings no longer have") as caught:
        load_config(base_config(couplings=[{"type": f"{module}:OldStyle", "param": "activation.weight"}]))
    assert f"{old} (" in str(caught.value) and instead in str(caught.value)


def test_a_coupling_that_rewrites_values_must_say_so(base_config):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    with pytest.raises(ConfigError, match=r"does not declare `rewrites_values = True`"):
        prepare(base_config(couplings=[{"type": "tests.helpers:UndeclaredRewrite", "param": "activation.weight"}]))


def test_a_coupling_reads_a_hosts_members_as_columns_and_gets_each_members_own_term_and_gradient():
    """A host hands a coupling its members' live values as columns (row i member i's) and everyone's
    exchanged values beside them (Coupling.values_against): separation's few tensor ops on the
    columns and the base class's member-by-member form (what a user's coupling inherits) give each
    member its own term, as value_for on its own live value against its partners' exchanged ones,
    with the gradient reaching the column's rows."""
    import torch

    from poptrain.couplings import Columns, Coupling, PopulationInfo, Quantity
    from poptrain.couplings.separation import Separation, SeparationConfig

    names = [f"m{i}" for i in range(7)]
    separation = Separation(
        SeparationConfig(type="separation", param="activation.weight", margin=0.5), PopulationInfo(names, {n: {"activation.weight": (2,)} for n in names})
    )
    exchanged = {Quantity(n, "param", "activation.weight"): torch.tensor([0.1 * i * i, -0.05 * i]) for i, n in enumerate(names)}
    host = names[2:5]
    live = torch.stack([exchanged[Quantity(n, "param", "activation.weight")] + 0.03 for n in host]).requires_grad_()
    own = Columns(tuple(host), {("param", "activation.weight"): live})
    assert own[Quantity("m3", "param", "activation.weight")].tolist() == live[1].tolist() and Quantity("m0", "param", "activation.weight") not in own
    for values in (separation.values_against(host, own, exchanged), Coupling.values_against(separation, host, own, exchanged)):
        (gradient,) = torch.autograd.grad(values.sum(), live)
        for i, name in enumerate(host):
            mine = live[i].detach().clone().requires_grad_()
            alone = separation.value_for(name, {**exchanged, Quantity(name, "param", "activation.weight"): mine})
            torch.testing.assert_close(values[i], alone.detach())
            torch.testing.assert_close(gradient[i], torch.autograd.grad(alone, mine)[0])


@pytest.mark.parametrize("margin", [0.01, 0.0, 5.0])
def test_separation_of_scalar_slopes_counts_only_the_near_pairs_and_changes_no_value_or_gradient(margin):
    """A stack of a thousand PReLU slopes under the hinge: only pairs closer than the margin have a
    penalty or a gradient, so separation looks only at those (found in the sorted exchanged slopes)
    and gets, bitwise, the values and gradients of all pairs: exactly 0 is what the others add.
    Margins: a few near pairs, none, and every pair near (then computed as every pair). A NaN slope is not hidden (no near pairs
    for it): it reaches the step's guard as the full sum gives it."""
    import torch

    from poptrain.couplings import Columns, PopulationInfo, Quantity
    from poptrain.couplings.separation import Separation, SeparationConfig

    names = [f"m{i}" for i in range(300)]
    shapes = {n: {"activation.weight": (1,)} for n in names}
    separation = Separation(SeparationConfig(type="separation", param="activation.weight", margin=margin), PopulationInfo(names, shapes))
    generator = torch.Generator().manual_seed(0)
    slopes = 0.25 + 0.2 * torch.rand(len(names), 1, generator=generator)
    slopes[7] = slopes[8] + margin  # a pair at the margin exactly
    exchanged = {Quantity(n, "param", "activation.weight"): slopes[i] for i, n in enumerate(names)}
    host = names[100:250]
    live = (slopes[100:250] + 0.001 * torch.randn(len(host), 1, generator=generator)).requires_grad_()
    own = Columns(tuple(host), {("param", "activation.weight"): live})

    def near_and_every(exchanged):
        """The values and gradients with the near pairs, and with every pair (as before the near pairs)."""
        results = []
        for near in (True, False):
            if not near:
                separation._near_pairs_suffice = lambda live: False
            values = separation.values_against(host, own, exchanged)
            results.append((values, torch.autograd.grad(values.sum(), live)[0]))
        del separation._near_pairs_suffice
        return results

    (near, near_gradient), (every, every_gradient) = near_and_every(exchanged)
    assert torch.equal(near, every) and torch.equal(near_gradient, every_gradient)
    assert (near > 0).any() == (margin > 0)
    # Taken where the near pairs are few; where most pairs are near (all members alike), every pair is computed.
    all_pairs = len(host) * (len(names) - 1)
    assert (separation._near_pairs(tuple(host), live, slopes, all_pairs) is None) == (margin == 5.0)
    exchanged[Quantity("m3", "param", "activation.weight")] = torch.tensor([float("inf")])  # no pair near it: no penalty, as with every pair
    (near, _), (every, _) = near_and_every(exchanged)
    assert torch.equal(near, every)
    exchanged[Quantity("m3", "param", "activation.weight")] = torch.tensor([float("nan")])
    assert torch.isnan(separation.values_against(host, own, exchanged)).all()
    live.data[5] = float("nan")
    assert torch.isnan(separation.values_against(host, own, {**exchanged, Quantity("m3", "param", "activation.weight"): slopes[3]})[5])


# -- averaging beyond the mean: PAPA's pull and gossip's pairs (issue 26) ---------------------------


def test_papa_pulls_each_member_a_fraction_rate_of_the_way_to_the_mean(base_config):
    members = [prelu_member("m1"), prelu_member("m2"), prelu_member("m3")]
    _, _, (papa, plain) = couplings_for(
        base_config,
        [{"type": "average", "name": "papa", "params": ["activation.*"], "rate": 0.25}, {"type": "average", "name": "plain", "params": ["activation.*"]}],
        members,
    )
    q = slopes(m1=1.0, m2=3.0, m3=8.0)  # mean 4
    out = papa.rewrite("param", 0, q, {})
    assert {m: float(out[Quantity(m, "param", "activation.weight")]) for m in ("m1", "m2", "m3")} == {"m1": 1.75, "m2": 3.25, "m3": 7.0}
    assert float(sum(out.values())) / 3 == pytest.approx(4.0), "the pull leaves the mean where it is"
    plain_out = plain.rewrite("param", 0, q, {})
    assert {q.member: float(v) for q, v in plain_out.items()} == {"m1": 4.0, "m2": 4.0, "m3": 4.0}, "rate 1 (the default) is the mean itself"
    assert papa.metrics(0, q)["divergence/m3"] == pytest.approx(4.0), "distance to the mean before the pull"
    (rewrite,) = papa.rewrites()
    assert rewrite.due(0, final=False) and rewrite.due(5, final=True), "scheduled as plain averaging: every `every` exchanges and after the last step"


@pytest.mark.parametrize(
    "coupling, key, words",
    [
        ({"type": "average", "rate": 0.0}, "couplings.0.rate", "must be in (0, 1], got 0.0"),
        ({"type": "average", "rate": 1.5}, "couplings.0.rate", "must be in (0, 1], got 1.5"),
        ({"type": "average", "rate": -0.1}, "couplings.0.rate", "fraction of the way to the mean"),
        ({"type": "average", "members": ["m1"], "into": "m2", "rate": 0.5}, "couplings.0", "`rate` pulls members towards their mean, and `into` leaves them"),
        ({"type": "gossip", "members": ["m1"]}, "couplings.0.members", "needs at least two members"),
        ({"type": "gossip", "every": 0}, "couplings.0.every", "greater than or equal to 1"),
        ({"type": "wash"}, "couplings.0.fraction", "required key is missing"),
        ({"type": "wash", "fraction": 0.0}, "couplings.0.fraction", "must be in (0, 1], got 0.0"),
        ({"type": "wash", "fraction": 1.5}, "couplings.0.fraction", "probability that a position is shuffled"),
        ({"type": "wash", "fraction": 0.1, "members": ["m1"]}, "couplings.0.members", "needs at least two members"),
        ({"type": "diloco"}, "couplings.0.every", "required key is missing"),
        ({"type": "diloco", "every": 5, "outer_momentum": 1.0}, "couplings.0.outer_momentum", "less than 1"),
        ({"type": "diloco", "every": 5, "outer_lr": 0}, "couplings.0.outer_lr", "greater than 0"),
        ({"type": "diloco", "every": 5, "members": ["m2"]}, "couplings.0.members", "needs at least two members"),
    ],
)
def test_averaging_family_config_errors_name_the_key(base_config, coupling, key, words):
    from poptrain.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(base_config(couplings=[coupling]))
    assert any(k == key and words in msg for k, msg in info.value.problems), info.value.problems


@pytest.mark.parametrize("coupling", [{"type": "gossip"}, {"type": "average", "rate": 0.5}, {"type": "wash", "fraction": 0.1}, {"type": "diloco", "every": 5}])
def test_the_averaging_family_refuses_async_exchange_with_the_reason(base_config, coupling):
    from poptrain.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(base_config(couplings=[coupling], exchange={"mode": "async"}))
    assert any(
        k == "couplings.0.type" and "replaces members' values at exchanges, which needs every member at the same exchange: use `exchange.mode: sync`" in msg
        for k, msg in info.value.problems
    ), info.value.problems


def test_gossip_pairs_come_from_the_seed_and_the_step_alone():
    import random

    from poptrain.couplings.averaging import gossip_pairs

    names = ["a", "b", "c", "d", "e"]
    pairs = gossip_pairs(names, 7, 12)
    assert len(pairs) == 2 and len({m for pair in pairs for m in pair}) == 4, "two disjoint pairs; the odd one out keeps its value"
    assert pairs == gossip_pairs(list(names), 7, 12), "a resumed run decides the same"
    order = list(names)
    random.Random("poptrain-gossip-7-12").shuffle(order)
    assert pairs == [(order[0], order[1]), (order[2], order[3])], "the documented recipe"
    assert len({tuple(gossip_pairs(names, 7, step)) for step in range(20)}) > 5, "a new draw each round"
    assert gossip_pairs(names, 8, 12) != pairs or gossip_pairs(names, 8, 13) != gossip_pairs(names, 7, 13), "and from the seed"


def test_the_coordinator_gives_gossip_the_round_and_each_pair_gets_its_mean(base_config):
    """The coordinator's round (CouplingEvaluator.complete_round, no Ray) replaces each drawn pair
    by its mean and leaves the odd member out alone; another step draws other pairs."""
    from poptrain.couplings.averaging import gossip_pairs

    members = [prelu_member("m1"), prelu_member("m2"), prelu_member("m3")]
    cfg = load_config(base_config(members=members, couplings=[{"type": "gossip", "params": ["activation.*"]}], seed=3))
    evaluator = CouplingEvaluator(cfg, inspect_population(cfg))
    start = {"m1": 1.0, "m2": 2.0, "m3": 4.0}
    seen = set()
    for step in range(6):
        values = {m: {Quantity(m, "param", "activation.weight"): torch.tensor([v]).numpy()} for m, v in start.items()}
        reply, _ = evaluator.complete_round("param", step, values)
        ((a, b),) = gossip_pairs(["m1", "m2", "m3"], 3, step)
        (odd,) = {"m1", "m2", "m3"} - {a, b}
        assert {q.member: float(v[0]) for q, v in reply.replace.items()} == {a: (start[a] + start[b]) / 2, b: (start[a] + start[b]) / 2}, step
        assert odd not in {q.member for q in reply.replace}
        seen.add((a, b))
    assert len(seen) > 1
    metrics = evaluator.coupling_metrics("param", 5)
    assert metrics["coupling/gossip/divergence/m3"] == pytest.approx(4.0 - 7.0 / 3), "distance to the population's mean, before the round"
    before = sorted(abs(v - 7.0 / 3) for v in start.values())
    assert [metrics[f"coupling/gossip/distance/before/{s}"] for s in ("min", "median", "max")] == pytest.approx(before)
    after = dict(start, **dict.fromkeys((a, b), (start[a] + start[b]) / 2))  # round 5's pair took its mean
    spread = sorted(abs(v - sum(after.values()) / 3) for v in after.values())
    assert [metrics[f"coupling/gossip/distance/after/{s}"] for s in ("min", "median", "max")] == pytest.approx(spread), "after the round"


def test_wash_permutes_the_values_of_the_drawn_positions_among_members_and_leaves_the_others():
    from poptrain.couplings.averaging import round_generator, wash_shuffle

    columns = torch.randn(5, 40, 50)  # five members' values of one parameter, side by side
    shuffled = wash_shuffle(columns, 0.2, round_generator("wash", 7, 3))
    assert torch.equal(shuffled, wash_shuffle(columns, 0.2, round_generator("wash", 7, 3))), "the seed and the step decide"
    assert not torch.equal(shuffled, wash_shuffle(columns, 0.2, round_generator("wash", 7, 4))), "a new draw each round"
    moved = (shuffled != columns).any(dim=0)
    assert 0.15 < float(moved.float().mean()) < 0.22, "about a fifth of the positions (less the draws that leave them in place)"
    assert torch.equal(shuffled.sort(dim=0).values, columns.sort(dim=0).values), "each position's values are those the members held: only permuted"
    assert torch.equal(shuffled[:, ~moved], columns[:, ~moved])
    assert torch.equal(wash_shuffle(columns, 1.0, round_generator("wash", 7, 3)).sort(dim=0).values, columns.sort(dim=0).values)


def test_the_coordinator_saves_dilocos_state_for_each_checkpoint_and_a_resumed_one_starts_from_it(base_config, tmp_path):
    """DiLoCo's global weights and outer momentum, saved by the coordinator after the last parameter
    round before each checkpoint step (no Ray); a new coordinator for the same run folder, once every
    member has a checkpoint at step 4, holds them bitwise as they were before step 4, and answers
    the next round as the first coordinator does."""
    import numpy as np

    from poptrain.coordinator.coordinator import Coordinator
    from poptrain.storage.checkpoint import COUPLING_STATE, save_checkpoint, steps_of

    members = [prelu_member("m1"), prelu_member("m2"), prelu_member("m3")]
    cfg = load_config(base_config(members=members, couplings=[{"type": "diloco", "every": 2, "params": ["activation.*"]}], steps=10, checkpoint={"every": 2}))
    population = inspect_population(cfg)
    first = Coordinator(cfg, population, str(tmp_path))
    (diloco,) = first.evaluator.couplings
    names = ["m1", "m2", "m3"]

    def round_at(coordinator, step):
        values = {Quantity(m, "param", "activation.weight"): np.array([0.25 * (i + 1) + 0.1 * step * i], dtype=np.float32) for i, m in enumerate(names)}
        return coordinator.exchange("param", step, names, values)

    for step in range(4):
        round_at(first, step)
    assert steps_of(tmp_path, COUPLING_STATE) == [2, 4], "one state per checkpoint step, written ahead of the members' checkpoints"
    assert diloco.momentum, "an outer step taken (at step 2): the momentum is state"
    before = {part: {k: v.clone() for k, v in tensors.items()} for part, tensors in diloco.state_dict().items()}
    for name in names:
        save_checkpoint({}, tmp_path, name, 4, 2)
    resumed = Coordinator(cfg, population, str(tmp_path))
    (restored,) = resumed.evaluator.couplings
    for part, tensors in before.items():
        assert tensors.keys() == restored.state_dict()[part].keys()
        assert all(torch.equal(v, restored.state_dict()[part][k]) for k, v in tensors.items()), part
    ours, theirs = round_at(first, 4), round_at(resumed, 4)
    assert ours.replace.keys() == theirs.replace.keys() and all(np.array_equal(ours.replace[q], theirs.replace[q]) for q in ours.replace)


@pytest.mark.parametrize(
    "coupling",
    [{"type": "average"}, {"type": "average", "rate": 0.25}, {"type": "gossip"}, {"type": "wash", "fraction": 0.3}, {"type": "diloco", "every": 2}],
    ids=["average", "papa", "gossip", "wash", "diloco"],
)
def test_a_round_written_in_place_into_mapped_members_matches_one_sent_as_copies_bitwise_with_the_same_distances(base_config, coupling):
    """The coordinator's rounds (no Ray) on four members whose parameters it maps, written straight
    into that memory, against the same rounds on members that send copies and receive new values:
    the same values bit for bit, round after round (a step of 'training' in between), and the same
    distances before and after each round, though the in-place round overwrote the values the
    distances before it are of. Nothing of a mapped member is sent back."""
    members = [prelu_member(f"m{i}") for i in range(1, 5)]
    cfg = load_config(base_config(members=members, couplings=[{**coupling, "name": "c"}], seed=2, steps=8))
    population = inspect_population(cfg)
    mapped, copies = CouplingEvaluator(cfg, population), CouplingEvaluator(cfg, population)
    generator = torch.Generator().manual_seed(0)
    memory = {m: {n: torch.randn(shape, generator=generator) for n, shape in population.param_shapes[m].items()} for m in cfg.member_names}
    sent = {m: {n: t.clone() for n, t in params.items()} for m, params in memory.items()}
    for member, views in memory.items():
        mapped.attach(member, views)
    for step in range(5):
        reply, written = mapped.complete_round("param", step, {m: {} for m in memory})
        assert not reply.replace and all(t is memory[q.member][q.key] for q, t in written.items()), "written in place, nothing sent"
        arrays = {m: {Quantity(m, "param", n): t.numpy() for n, t in params.items()} for m, params in sent.items()}
        reply, _ = copies.complete_round("param", step, arrays)
        for q, value in reply.replace.items():
            sent[q.member][q.key] = torch.from_numpy(value).clone()
        assert all(torch.equal(memory[m][n], sent[m][n]) for m in memory for n in memory[m]), step
        in_place, as_copies = mapped.coupling_metrics("param", step), copies.coupling_metrics("param", step)
        assert in_place == as_copies and "coupling/c/distance/before/max" in in_place, step
        assert ("coupling/c/distance/after/max" in in_place) == bool(written), step
        for m in memory:  # a training step: the same change to both
            for n in memory[m]:
                change = torch.randn(memory[m][n].shape, generator=generator)
                memory[m][n].add_(change)
                sent[m][n] = sent[m][n] + change


def test_a_round_is_not_written_in_place_into_parameters_another_coupling_reads_in_the_same_round(base_config):
    """DiLoCo's first round (every member set to the first one's weights) on four mapped members and
    `average` of the same members into a target, in one round: the target gets the mean of the
    values the members sent, not of those DiLoCo wrote (DiLoCo's round goes through new values,
    applied after every coupling has read)."""
    members = [prelu_member(f"m{i}") for i in range(1, 5)] + [prelu_member("t", trainable=False)]
    sources = ["m1", "m2", "m3", "m4"]
    couplings = [{"type": "diloco", "every": 1, "members": sources}, {"type": "average", "name": "into", "members": sources, "into": "t"}]
    cfg = load_config(base_config(members=members, couplings=couplings))
    population = inspect_population(cfg)
    evaluator = CouplingEvaluator(cfg, population)
    generator = torch.Generator().manual_seed(0)
    memory = {m: {n: torch.randn(shape, generator=generator) for n, shape in population.param_shapes[m].items()} for m in cfg.member_names}
    sent = {m: {n: t.clone() for n, t in params.items()} for m, params in memory.items()}
    for member, views in memory.items():
        evaluator.attach(member, views)
    evaluator.complete_round("param", 0, {m: {} for m in memory})
    for name, value in memory["t"].items():
        assert torch.equal(value, sum(sent[m][name] for m in sources) / 4), name
        assert all(torch.equal(memory[m][name], sent["m1"][name]) for m in sources), "and DiLoCo started every member from m1"


def test_the_figures_draw_the_margin_a_coupling_declares_and_none_for_the_others():
    """plots.py names no coupling: it draws the band a coupling's class declares
    (``Coupling.plotted_margin``, from the settings as the parent run's params hold them)."""
    from poptrain.tracking.plots import _margin

    assert _margin({"type": "separation", "margin": "2.0", "param": "activation.weight"}) == 2.0
    assert _margin({"type": "separation", "variant": "repulsion", "margin": "2.0"}) is None, "the repulsion variant has no margin"
    assert _margin({"type": "average", "rate": "0.1"}) is None
    assert _margin({"type": "no.such.module:Coupling", "margin": "1"}) is None, "a coupling not importable where the figures are drawn"


def test_a_coupling_that_overrides_value_for_must_declare_whether_its_term_is_joint(base_config, tmp_path, monkeypatch):
    """term_is_joint must agree with value_for, which nothing can check by running it: a class
    overriding value_for without declaring it is refused where it is defined, and a config naming
    it by import path gets the reason under its `type` (exit 2, nothing started)."""
    from poptrain.config import ConfigError, validate_config

    with pytest.raises(TypeError, match="overrides value_for but does not declare term_is_joint"):

        class Undeclared(Coupling):
            def reads(self):
                return []

            def value_for(self, member, q):
                return None

    (tmp_path / "undeclared_coupling.py").write_text(
        "from poptrain.couplings import Coupling\n\n"
        "class Pull(Coupling):\n"
        "    def reads(self):\n        return []\n\n"
        "    def value_for(self, member, q):\n        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        validate_config(base_config(couplings=[{"type": "undeclared_coupling:Pull"}]))
    assert any(key == "couplings.0.type" and "does not declare term_is_joint" in reason for key, reason in refused.value.problems), refused.value.problems
