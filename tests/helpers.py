"""User code referenced by import path from test configs (importable by actors: see conftest)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import TensorDataset

from poptrain.couplings import Quantity, Rewrite, coupling_function
from poptrain.couplings.separation import Separation, SeparationConfig


class TinyNet(nn.Module):
    """A user model: ``body`` then ``head``."""

    def __init__(self, in_features: int = 4, out_features: int = 1):
        super().__init__()
        self.body = nn.Linear(in_features, 8)
        self.head = nn.Linear(8, out_features)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def tiny_data(n: int = 64, in_features: int = 4, split: str = "all") -> TensorDataset:
    """A user's dataset by import path, with a held-out split as the built-ins have."""
    from poptrain.builtins.data import split_indices

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, in_features, generator=gen)[split_indices(n, split, 0.2)]
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def not_a_dataset(n: int = 3):
    return 42


class SlowDataset(torch.utils.data.Dataset):
    """A straggler's data: every item takes ``delay_s`` to load."""

    def __init__(self, n: int = 64, in_features: int = 20, delay_s: float = 0.5):
        self.inner, self.delay_s = tiny_data(n, in_features), delay_s

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        import time

        time.sleep(self.delay_s)
        x, _ = self.inner[index]
        return x, x.sum().reshape(1)


def slow_data(n: int = 64, in_features: int = 20, delay_s: float = 0.5):
    return SlowDataset(n, in_features, delay_s)


def squared_loss_gap(losses, first: str = "m1", second: str = "m2"):
    """A non-linear `relative` combination (a user's `fn`): ``(L[first] - L[second])**2``."""
    return (losses[first] - losses[second]) ** 2


def halve_gradient(name, param, grad, factor: float = 0.5):
    """A user gradient transform (seed 002: "give a layer a gradient of its own")."""
    return grad * factor


def zero_gradient_made_anew(name, param, grad):
    """A transform that builds its result with ``torch.zeros``: on the CPU, in float32, whatever the parameter's."""
    return torch.zeros(tuple(param.shape))


def poisoned_data(n: int = 256, in_features: int = 20, bad_index: int = 40) -> TensorDataset:
    """A regression set with one NaN sample (in the second batch of 32 when not shuffled)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, in_features, generator=gen)
    y = x.sum(dim=1, keepdim=True) / in_features
    x[bad_index, 0] = float("nan")
    return TensorDataset(x, y)


def finite_term_with_nan_gradient(model, inputs, outputs, targets):
    """0 in value, NaN in gradient (d sqrt(x)/dx at 0 is inf, times the chain's 0): only the gradient check sees it."""
    return torch.sqrt((outputs * 0).sum())


def dies_while_restarting(marker: str, deaths: int = 1, n: int = 256, in_features: int = 20):
    """Seed 000's regression data (``synthetic_regression``), built by a process that dies right
    there (as if killed while starting) once ``marker`` exists, ``deaths`` times: a test writes
    the marker when it kills the member, so the member's replacement dies while starting and
    the replacement's replacement trains."""
    import os
    from pathlib import Path

    from poptrain.builtins.data import synthetic_regression

    path = Path(marker)
    if path.exists() and int(path.read_text() or 0) < deaths:
        path.write_text(str(int(path.read_text() or 0) + 1))
        os._exit(1)
    return synthetic_regression(n=n, in_features=in_features)


class BFloat16MLP(nn.Module):
    """A member trained in bfloat16: the builtin MLP's parameters in bfloat16 (names as the MLP's),
    float32 inputs and outputs."""

    def __init__(self, **kwargs):
        super().__init__()
        from poptrain.builtins.models import MLP

        self.mlp = MLP(**kwargs).to(torch.bfloat16)

    def forward(self, x):
        return self.mlp(x.to(torch.bfloat16)).float()


class TwoInputNet(nn.Module):
    """A user model of two inputs: ``forward(a, b)``."""

    def __init__(self, in_features: int = 4):
        super().__init__()
        self.a = nn.Linear(in_features, 1)
        self.b = nn.Linear(in_features, 1)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


class HangingSeparationConfig(SeparationConfig):
    hang_at_exchange: int = Field(3, ge=0)
    hang_s: float = Field(120.0, gt=0)


class SeparationThatHangsTheCoordinator(Separation):
    """Separation whose coordinator-side ``rewrite`` blocks for ``hang_s`` at parameter exchange
    ``hang_at_exchange``: a stuck coordinator exchange thread. The coordinator runs it while
    completing the round, under its lock, before any member's reply is sent. It rewrites nothing,
    so the values stay small and travel over the direct connection (poptrain.exchange.channel)."""

    Config = HangingSeparationConfig
    rewrites_values = True

    def rewrites(self):
        return [Rewrite("param", ())]  # due at every parameter exchange

    def rewrite(self, kind, step, q, out):
        import time

        self.rewrites_done = getattr(self, "rewrites_done", 0) + 1
        if self.rewrites_done - 1 == self.config.hang_at_exchange:
            time.sleep(self.config.hang_s)
        return {}


class SeparationWithOwnMetrics(Separation):
    """Separation whose members each log a value of their own (``Coupling.metrics_for``): their
    coupled parameter's sum, under ``coupling/<name>/own_sum`` on logged steps."""

    def metrics_for(self, member, q):
        return {"own_sum": float(q[Quantity(member, "param", self.config.param)].sum())}


class BuggyCheckSeparation(Separation):
    """A user coupling whose own ``check_config`` has a bug (it raises instead of listing problems)."""

    @classmethod
    def check_config(cls, config, run):
        return _buggy_lookup(config.param)


def _buggy_lookup(param: str):
    return {"weight": []}[param]  # KeyError for any other parameter name


class UndeclaredRewrite(Separation):
    """Rewrites values at exchanges without declaring `rewrites_values` (the async check relies on it)."""

    def rewrites(self):
        return [Rewrite("param", ())]


# Couplings written as functions (poptrain.couplings.coupling_function), registered when this
# module is imported: Ray's workers import it when they unpickle the run's config.
SLOPES = {"a": {"member": "m1", "param": "activation.weight"}, "b": {"member": "m2", "param": "activation.weight"}}


@coupling_function("slope_gap", reads=SLOPES)
def slope_gap(a, b):
    """Seed 000's penalty, one line: the PReLU slopes of m1 and m2 kept 2 apart."""
    return torch.relu(2 - torch.abs(a - b).sum())


@coupling_function("pair_gap")
def pair_gap(a, b):
    """The same penalty, its reads given by each config (one function for several pairs)."""
    return torch.relu(2 - torch.abs(a - b).sum())


@coupling_function("loss_gap", reads={"l1": {"member": "m1", "loss": "loss"}, "l2": {"member": "m2", "loss": "loss"}})
def loss_gap(l1, l2):
    return (l1 - l2) ** 2


@coupling_function("gap_as_float", reads=SLOPES)
def gap_as_float(a, b):
    """Returns a Python number: cut from the graph, it could train nothing."""
    return float(torch.relu(2 - torch.abs(a - b).sum()))


@coupling_function("gap_per_element", reads={"a": {"member": "m1", "param": "input.weight"}, "b": {"member": "m2", "param": "input.weight"}})
def gap_per_element(a, b):
    """Forgets to reduce: a (40, 20) tensor."""
    return torch.relu(2 - torch.abs(a - b))


@coupling_function("gap_that_raises", reads={"a": {"member": "m1", "param": "input.weight"}, "b": {"member": "m2", "param": "output.weight"}})
def gap_that_raises(a, b):
    """Subtracts parameters of shapes (40, 20) and (1, 40): broadcasting fails."""
    return torch.relu(2 - torch.abs(a - b).sum())


@coupling_function("prediction_gap", reads={"p1": {"member": "m1", "pred": "outputs"}, "p2": {"member": "m2", "pred": "outputs"}})
def prediction_gap(p1, p2):
    """Two regressors pulled towards each other's predictions on the same batch."""
    return ((p1 - p2) ** 2).mean()


class NormalizedNet(nn.Module):
    """A user model with BatchNorm: running statistics a stacked step would update in place."""

    def __init__(self, in_features: int = 20, out_features: int = 1):
        super().__init__()
        self.input, self.norm, self.output = nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.Linear(8, out_features)

    def forward(self, x):
        return self.output(torch.relu(self.norm(self.input(x))))


class FunctionalDropoutNet(nn.Module):
    """A user model calling dropout as a function: a random op a stack cannot draw from each member's stream."""

    def __init__(self, in_features: int = 20, out_features: int = 1):
        super().__init__()
        self.input, self.output = nn.Linear(in_features, 8), nn.Linear(8, out_features)

    def forward(self, x):
        return self.output(torch.nn.functional.dropout(torch.relu(self.input(x)), 0.2, self.training))


class TwiceDroppedNet(nn.Module):
    """A user model calling one nn.Dropout twice per forward: one mask per module and step cannot do."""

    def __init__(self, in_features: int = 20, out_features: int = 1):
        super().__init__()
        self.input, self.drop, self.output = nn.Linear(in_features, 8), nn.Dropout(0.2), nn.Linear(8, out_features)

    def forward(self, x):
        return self.output(self.drop(torch.relu(self.drop(self.input(x)))))


class BranchingNet(nn.Module):
    """A user model whose forward branches on its data: vmap cannot trace it."""

    def __init__(self, in_features: int = 20, out_features: int = 1):
        super().__init__()
        self.input = nn.Linear(in_features, out_features)

    def forward(self, x):
        hidden = self.input(x)
        return hidden if hidden.sum() > 0 else -hidden
