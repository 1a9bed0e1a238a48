"""Couplings written as functions (`poptrain.couplings.coupling_function`): registered by name like a
class, checked before anything starts, and exact as the built-in couplings are."""

from __future__ import annotations

import pytest
import torch
import yaml

import poptrain
from poptrain.builtins.data import synthetic_regression
from poptrain.config import ConfigError
from poptrain.couplings import Coupling, Quantity, coupling_function, resolve_coupling
from poptrain.driver.checks import prepare
from tests import helpers
from tests.conftest import REPO, SEED000_BATCH, SEED000_LR, poptrain_command, prelu_member, seed000_initial_modules, weights
from tests.reference import seed000_joint_training, sequential_batches

SLOPE = "activation.weight"


def slopes(first="m1", second="m2", param=SLOPE):
    return {"a": {"member": first, "param": param}, "b": {"member": second, "param": param}}


def refusal(base_config, coupling, members=None) -> str:
    """What `poptrain check` (its `prepare`) says of a config with this one coupling."""
    config = base_config(couplings=[coupling], **({"members": members} if members else {}))
    with pytest.raises(ConfigError) as caught:
        prepare(config)
    return caught.value.render()


# -- the interface -----------------------------------------------------------------------------


def test_a_function_coupling_is_an_ordinary_coupling_found_by_name_or_import_path():
    assert resolve_coupling("slope_gap") is helpers.slope_gap
    assert resolve_coupling("tests.helpers:slope_gap") is helpers.slope_gap
    assert issubclass(helpers.slope_gap, Coupling)


def test_the_one_line_function_has_the_built_in_separations_value_and_gradient(base_config):
    """On the same quantities, seed 000's penalty as a function and `separation` agree bitwise."""
    from poptrain.couplings import build_couplings

    cfg, population, _ = prepare(base_config(couplings=[{"type": "slope_gap"}, {"type": "separation", "param": SLOPE, "margin": 2.0}]))
    function, separation = build_couplings(cfg.couplings, population)
    assert function.members == function.trains == ["m1", "m2"] and function.weight == 1.0
    assert function.reads() == separation.reads()
    gradients = []
    for coupling in (function, separation):
        own = torch.tensor([0.25], requires_grad=True)
        q = {Quantity("m1", "param", SLOPE): own, Quantity("m2", "param", SLOPE): torch.tensor([0.75])}
        term = coupling.term("m1", q)
        term.backward()
        gradients.append((term.detach(), own.grad))
    assert torch.equal(gradients[0][0], gradients[1][0]) and torch.equal(gradients[0][1], gradients[1][1])


def test_reads_in_the_config_let_one_function_serve_several_pairs(base_config):
    from poptrain.couplings import build_couplings

    members = [prelu_member("m1"), prelu_member("m2"), prelu_member("m3")]
    cfg, population, _ = prepare(
        base_config(
            members=members,
            couplings=[
                {"type": "pair_gap", "name": "gap12", "reads": slopes("m1", "m2")},
                {"type": "pair_gap", "name": "gap23", "reads": slopes("m2", "m3"), "trains": ["m3"], "weight": 0.5},
                {"type": "slope_gap", "name": "gap13", "reads": {"b": {"member": "m3", "param": SLOPE}}},  # a replaces nothing: m1's slope
            ],
        )
    )
    gap12, gap23, gap13 = build_couplings(cfg.couplings, population)
    assert (gap12.members, gap12.trains) == (["m1", "m2"], ["m1", "m2"])
    assert (gap23.members, gap23.trains, gap23.weight) == (["m2", "m3"], ["m3"], 0.5)
    assert gap13.reads() == [Quantity("m1", "param", SLOPE), Quantity("m3", "param", SLOPE)]


def test_a_function_reading_losses_gets_them_after_the_forward_pass(base_config):
    from poptrain.couplings import build_couplings

    cfg, population, _ = prepare(base_config(couplings=[{"type": "loss_gap"}]))
    (gap,) = build_couplings(cfg.couplings, population)
    assert {q.phase for q in gap.reads()} == {"loss"}
    assert float(gap.value({Quantity("m1", "loss", "loss"): torch.tensor(3.0), Quantity("m2", "loss", "loss"): torch.tensor(1.0)})) == 4.0


def test_a_function_reading_predictions_gets_those_of_the_same_batch_only(base_config):
    from poptrain.couplings import build_couplings

    cfg, population, _ = prepare(base_config(couplings=[{"type": "prediction_gap"}]))
    (gap,) = build_couplings(cfg.couplings, population)
    assert {(q.kind, q.phase) for q in gap.reads()} == {("pred", "loss")}
    own, peer = torch.ones(32, 1, requires_grad=True), torch.zeros(32, 1)
    assert float(gap.term("m1", {Quantity("m1", "pred", "outputs"): own, Quantity("m2", "pred", "outputs"): peer}).detach()) == 1.0
    assert gap.term("m1", {Quantity("m1", "pred", "outputs"): own}) is None, "no term between exchanges, when the peer's are of another batch"


def test_predictions_of_members_with_different_batches_are_refused(base_config):
    members = [prelu_member("m1"), prelu_member("m2", data={"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": 16})]
    message = refusal(base_config, {"type": "prediction_gap"}, members)
    assert (
        "couplings.0.reads: coupling 'prediction_gap' reads their predictions, but members 'm1' and 'm2' do not see the same samples in the same order "
        "(batch_size 32 vs 16)" in message
    )


def test_predictions_in_async_mode_are_refused(base_config):
    with pytest.raises(ConfigError, match="couplings.0.reads: coupling 'prediction_gap' reads predictions, .*use `exchange.mode: sync`"):
        prepare(base_config(couplings=[{"type": "prediction_gap"}], exchange={"mode": "async"}))


def test_the_readme_example_function_works_as_written():
    import re

    from poptrain.couplings import COUPLINGS

    page = (REPO / "docs" / "writing-a-coupling.md").read_text(encoding="utf-8")
    code = re.search(r"## A function as a coupling.*?```python\n(.*?)```", page, re.S).group(1)
    assert "@coupling_function(" in code
    ours = COUPLINGS.pop("slope_gap")  # tests.helpers registers the same name
    try:
        namespace: dict = {}
        exec(compile(code, "docs/writing-a-coupling.md", "exec"), namespace)
        example = COUPLINGS["slope_gap"]
        assert example is namespace["slope_gap"] and example.declared_reads == ours.declared_reads
        a, b = torch.tensor([0.25]), torch.tensor([1.0])
        assert torch.equal(example.fn(a=a, b=b), ours.fn(a=a, b=b))
    finally:
        COUPLINGS["slope_gap"] = ours


def test_a_function_coupling_may_not_take_a_built_in_name_or_an_unusable_one():
    with pytest.raises(ValueError, match="'separation' is a built-in coupling"):
        coupling_function("separation", reads=slopes())(lambda a, b: (a - b).sum())
    with pytest.raises(ValueError, match="must be a Python identifier"):
        coupling_function("slope-gap")
    with pytest.raises(ValueError, match="read 'a'.*is not a read"):
        coupling_function("bad_read", reads={"a": {"member": "m1"}})


# -- refused before anything starts, naming couplings.<i> and the coupling ------------------------


def test_a_read_of_a_parameter_a_member_lacks_names_the_member_and_its_parameters(base_config):
    message = refusal(base_config, {"type": "pair_gap", "reads": slopes(param="activation.slope")})
    assert "couplings.0.reads.a: coupling 'pair_gap' reads parameter 'activation.slope' of member 'm1', which has no such parameter" in message
    assert "its parameters are ['input.weight', 'input.bias', 'activation.weight'" in message
    assert "couplings.0.reads.b:" in message and "of member 'm2'" in message


def test_a_read_of_an_unknown_member_lists_the_members(base_config):
    message = refusal(base_config, {"type": "pair_gap", "name": "gap", "reads": slopes("m1", "m3")})
    assert (
        "couplings.0.reads.b.member: coupling 'gap' reads parameter 'activation.weight' of member 'm3' under 'b', but there is no member 'm3'; "
        "members are ['m1', 'm2']" in message
    )


def test_a_read_of_a_loss_or_term_a_member_lacks_lists_its_terms(base_config):
    message = refusal(base_config, {"type": "loss_gap", "reads": {"l2": {"member": "m2", "loss": "smoothness"}}})
    assert (
        "couplings.0.reads.l2: coupling 'loss_gap' reads 'smoothness' of member 'm2', which has no such loss or term; its losses and terms are ['loss']"
        in message
    )


def test_a_function_returning_a_non_tensor_is_refused(base_config):
    message = refusal(base_config, {"type": "gap_as_float"})
    assert "couplings.0: coupling 'gap_as_float': tests.helpers.gap_as_float returns float 2.0, not a tensor" in message


def test_a_function_returning_a_non_scalar_tensor_is_refused(base_config):
    message = refusal(base_config, {"type": "tests.helpers:gap_per_element", "name": "elementwise"})
    assert "couplings.0: coupling 'elementwise': tests.helpers.gap_per_element returns a tensor of shape [40, 20], not a scalar" in message


def test_a_function_that_raises_is_refused_with_its_error_and_where_it_happened(base_config):
    message = refusal(base_config, {"type": "gap_that_raises"})
    assert "couplings.0: coupling 'gap_that_raises': tests.helpers.gap_that_raises raised RuntimeError: The size of tensor a (20) must match" in message
    assert "a=[40, 20], b=[1, 40]" in message
    assert "return torch.relu(2 - torch.abs(a - b).sum())" in message, "its traceback shows the line"


def test_reads_the_function_cannot_take_are_refused(base_config):
    message = refusal(base_config, {"type": "pair_gap", "reads": {"a": slopes()["a"], "c": slopes()["b"]}})
    assert "couplings.0.reads: coupling 'pair_gap': tests.helpers.pair_gap cannot be called with its reads ['a', 'c'] as arguments" in message


def test_members_other_than_those_it_reads_are_refused(base_config):
    members = [prelu_member("m1"), prelu_member("m2"), prelu_member("m3")]
    message = refusal(base_config, {"type": "slope_gap", "members": ["m1", "m3"]}, members)
    assert (
        "couplings.0.members: coupling 'slope_gap' reads members ['m1', 'm2'], so its `members` must be those: missing ['m2']; reads nothing of ['m3']"
        in message
    )
    message = refusal(base_config, {"type": "slope_gap", "trains": ["m3"]}, members)
    assert "couplings.0.trains: coupling 'slope_gap' trains member 'm3' but reads nothing of it" in message


def test_poptrain_check_exits_2_naming_the_coupling(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "prelu_separation.yaml").read_text())
    config["couplings"] = [{"type": "tests.helpers:gap_per_element", "name": "elementwise"}]
    path = tmp_path / "elementwise.yaml"
    path.write_text(yaml.safe_dump(config))
    done = poptrain_command("check", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "couplings.0: coupling 'elementwise'" in done.stderr and "not a scalar" in done.stderr and "Traceback" not in done.stderr


# -- end to end ------------------------------------------------------------------------------------


def test_seed_000_penalty_as_a_one_line_function_matches_the_single_process_reference_bitwise(ray_session, base_config, tmp_path):
    """`type: slope_gap` (a name registered in tests.helpers, which the workers import when they
    receive the config), one member per process, `exchange.every: 1`: every final weight is the
    single-process seed 000 reference's, bit for bit."""
    steps = 25
    modules, paths = seed000_initial_modules(tmp_path)
    data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": SEED000_BATCH, "shuffle": False}
    result = poptrain.run(
        base_config(
            steps=steps,
            exchange={"every": 1, "mode": "sync"},
            placement={"members_per_host": 1},
            members=[prelu_member(f"m{i + 1}", init=paths[i], data=data, optimizer={"name": "adam", "lr": SEED000_LR}) for i in range(2)],
            couplings=[{"type": "slope_gap"}],
        )
    )
    reference = seed000_joint_training(*modules, sequential_batches(synthetic_regression(n=256, in_features=20), SEED000_BATCH), steps, SEED000_LR)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        trained = weights(result.output_dir, name)
        for key, expected in module.state_dict().items():
            assert torch.equal(trained[key], expected), f"{name}.{key}: {(trained[key] - expected).abs().max()}"
    assert float((trained[SLOPE] - weights(result.output_dir, "m1")[SLOPE]).abs()) > 0.1, "the coupling acted"
    assert "coupling/slope_gap" in result.metrics["m1"]
