"""Built-in evaluation metrics ``f(outputs, targets, **kwargs) -> float`` on a whole held-out set.

``outputs``: the model's outputs for every held-out sample, [n, ...]; ``targets``: their targets.
Classification outputs are logits or log-probabilities [n, classes] with class-index targets
[n]; a single output column [n, 1] or [n] is a binary logit (positive above 0).
"""

from __future__ import annotations

import torch


def _predicted(outputs: torch.Tensor) -> torch.Tensor:
    if outputs.dim() >= 2 and outputs.shape[-1] > 1:
        return outputs.argmax(dim=-1)
    return (outputs.reshape(-1) > 0).long()


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of samples whose predicted class is the target's, in [0, 1]."""
    return float((_predicted(outputs) == targets.reshape(-1).long()).float().mean())


def top_k_accuracy(outputs: torch.Tensor, targets: torch.Tensor, k: int = 5) -> float:
    """The fraction of samples whose target is among the ``k`` highest-scored classes, in [0, 1]."""
    top = outputs.topk(min(k, outputs.shape[-1]), dim=-1).indices
    return float((top == targets.reshape(-1, 1).long()).any(dim=-1).float().mean())


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error, in the targets' units squared."""
    return float((outputs.reshape(targets.shape).float() - targets.float()).pow(2).mean())


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute error, in the targets' units."""
    return float((outputs.reshape(targets.shape).float() - targets.float()).abs().mean())


METRICS = {"accuracy": accuracy, "top_k_accuracy": top_k_accuracy, "mse": mse, "mae": mae}
