"""Opt-in balancing of a member's own objective terms (``balancing.method``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class TermBalancer:
    """Opt-in balancing of a member's own objective terms (``balancing.method: magnitude``).

    Each term's weight is divided by an exponential moving average of the term's absolute value
    (detached), so every term contributes at a comparable scale whatever its units; the sign
    of the weight (minimize / maximize) is kept. This is the "loss-magnitude normalisation"
    heuristic (cf. Chen et al., GradNorm, ICML 2018, which balances gradient norms instead;
    and Kendall et al., CVPR 2018, uncertainty weighting): cheap, no extra backward pass.
    """

    def __init__(self, method: str, momentum: float, eps: float):
        self.method, self.momentum, self.eps = method, momentum, eps
        self.scale: dict[str, float] = {}

    def effective_weights(self, weights: dict[str, float], terms: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.method == "none":
            return dict(weights)
        out = {}
        for name, weight in weights.items():
            magnitude = abs(float(terms[name].detach()))
            previous = self.scale.get(name)
            if math.isfinite(magnitude):  # a NaN/inf term (skipped by `failure.nonfinite`) must not poison the estimate
                self.scale[name] = magnitude if previous is None else self.momentum * previous + (1 - self.momentum) * magnitude
            elif previous is None:
                self.scale[name] = 1.0
            out[name] = weight / max(self.scale[name], self.eps)
        return out

    def state_dict(self) -> dict[str, float]:
        return dict(self.scale)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale = {k: float(v) for k, v in state.items()}
