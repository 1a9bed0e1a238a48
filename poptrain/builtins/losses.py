"""Built-in task losses: ``f(outputs, targets) -> scalar`` (mean over the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def smooth_l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(outputs, targets)


def bce_with_logits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def squared_sum_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Seed 001's loss: ``mean(square(target - sum(outputs)))`` with the target taken from the first sample."""
    return torch.mean(torch.square(targets.reshape(-1)[0] - torch.sum(outputs)))


LOSSES = {
    "mse": mse,
    "l1": l1,
    "smooth_l1": smooth_l1,
    "cross_entropy": cross_entropy,
    "nll": nll,
    "bce_with_logits": bce_with_logits,
    "squared_sum_error": squared_sum_error,
}
