"""Built-in extra objective terms: ``f(model, inputs, outputs, targets, **kwargs) -> scalar``.

Unlike seed 001's ``torch.tensor([torch.sum(w) for w in net.parameters()])``, which builds a
new leaf tensor and so silently trains nothing, these keep the autograd graph.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn


def _selected(model: nn.Module, params: list[str] | str | None):
    patterns = [params] if isinstance(params, str) else (params or ["*"])
    return [p for name, p in model.named_parameters() if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]


def param_sum(model: nn.Module, inputs, outputs, targets, params: list[str] | str | None = None) -> torch.Tensor:
    """Sum of all (selected) parameter entries: seed 001's ``loss2``, with its gradient path intact."""
    return torch.stack([p.sum() for p in _selected(model, params)]).sum()


def param_l2(model: nn.Module, inputs, outputs, targets, params: list[str] | str | None = None) -> torch.Tensor:
    """Sum of squares of the (selected) parameters (an L2 penalty)."""
    return torch.stack([p.pow(2).sum() for p in _selected(model, params)]).sum()


def output_mean(model: nn.Module, inputs, outputs, targets) -> torch.Tensor:
    """Mean of the model's outputs on the batch."""
    return outputs.mean()


def detached_param_sum(model: nn.Module, inputs, outputs, targets) -> torch.Tensor:
    """Seed 001's literal ``loss2``: a new tensor, cut from the graph. It trains nothing; poptrain's
    gradient-path check exists to catch exactly this."""
    return torch.sum(torch.tensor([torch.sum(w) for w in model.parameters()]))


TERMS = {"param_sum": param_sum, "param_l2": param_l2, "output_mean": output_mean, "detached_param_sum": detached_param_sum}
