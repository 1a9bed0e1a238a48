"""Models and data of the benchmarks that poptrain's built-ins do not have (named by import path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class LookupTable(nn.Module):
    """A ``rows x dim`` float32 embedding table whose output is the mean of the looked-up row:
    ``rows * dim`` parameters, of which a step touches one row. The averaging benchmark's member,
    so that a step costs microseconds and a round's time is the averaging's."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(rows, dim)

    def forward(self, index: torch.Tensor) -> torch.Tensor:  # (batch,) int64 -> (batch, 1)
        return self.table(index).mean(dim=1, keepdim=True)


def row_indices(n: int = 4, rows: int = 1) -> TensorDataset:
    """``n`` samples: row index ``i % rows`` with target 0."""
    return TensorDataset(torch.arange(n) % rows, torch.zeros(n, 1))
