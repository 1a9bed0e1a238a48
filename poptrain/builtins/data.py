"""Built-in datasets that need no download: scikit-learn's bundled digits, and seeded synthetic sets.

Every function returns a ``torch.utils.data.TensorDataset`` of (inputs float32, targets).
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

DIGIT_VIEWS = ("full", "downsampled", "crop", "left", "right", "rows")
SPLITS = ("all", "train", "test")
SPLIT_SEED = 20_240_601  # fixed: every member, view and run sees the same held-out samples


def split_indices(n: int, split: str, test_fraction: float) -> torch.Tensor:
    """The indices of ``split`` in a dataset of ``n`` samples: ``all``, or a deterministic
    ``train`` / ``test`` partition (``test_fraction`` of the samples, at least one, at random with a
    fixed seed), each in dataset order so that views of the same samples stay aligned."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if split == "all":
        return torch.arange(n)
    test = torch.zeros(n, dtype=torch.bool)
    test[torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[: max(1, round(n * test_fraction))]] = True
    return torch.nonzero(test if split == "test" else ~test).reshape(-1)


def digits(
    view: str = "full", normalize: bool = True, limit: int | None = None, part: int = 0, parts: int = 1, split: str = "all", test_fraction: float = 0.2
) -> TensorDataset:
    """scikit-learn's 1,797 8x8 digit images (ships with the package), in one of several views.

    Views of the same samples, in the same order, so members can see different inputs:
    ``full`` [64], ``downsampled`` 2x2 mean-pooled [16], ``crop`` the central 6x6 [36],
    ``left``/``right`` halves [32], ``rows`` as a sequence [8 steps, 8 features] (for LSTMs).
    Targets are class indices 0-9 (int64). ``split``: ``train`` or ``test`` keep one side of a
    fixed partition (``test_fraction`` held out, the same samples in every view), ``all`` both.
    Then ``parts``/``part`` split the samples into ``parts`` disjoint shards (every ``parts``-th
    sample) and keep shard ``part`` (federated-style data), and ``limit`` keeps the first ones.
    """
    if view not in DIGIT_VIEWS:
        raise ValueError(f"unknown digits view {view!r}; choose one of {list(DIGIT_VIEWS)}")
    pixels, labels = load_digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 8, 8)  # values 0..16
    if normalize:
        images = images / 16.0
    targets = torch.tensor(labels, dtype=torch.int64)
    if view == "full":
        inputs = images.reshape(len(images), 64)
    elif view == "downsampled":
        inputs = images.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(len(images), 16)
    elif view == "crop":
        inputs = images[:, 1:7, 1:7].reshape(len(images), 36)
    elif view == "left":
        inputs = images[:, :, :4].reshape(len(images), 32)
    elif view == "right":
        inputs = images[:, :, 4:].reshape(len(images), 32)
    else:
        inputs = images
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, parts), got part={part}, parts={parts}")
    kept = split_indices(len(targets), split, test_fraction)
    inputs, targets = inputs[kept], targets[kept]
    inputs, targets = inputs[part::parts], targets[part::parts]
    if limit is not None:
        inputs, targets = inputs[:limit], targets[:limit]
    return TensorDataset(inputs.contiguous(), targets)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels float64 [1797, 64], labels int [1797]): what
    ``sklearn.datasets.load_digits()`` gives as ``data`` and ``target``.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) the way
    ``load_digits`` reads it, without importing scikit-learn: that import costs about 2 s of CPU
    and 150 MiB in every member process that uses the digits. Falls back to ``load_digits`` if
    the file is not there.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as file:
                table = np.loadtxt(file, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def synthetic_regression(
    n: int = 1024, in_features: int = 20, out_features: int = 1, noise: float = 0.1, seed: int = 0, split: str = "all", test_fraction: float = 0.2
) -> TensorDataset:
    """y = tanh(x W1) W2 + noise, with x ~ N(0, 1); fixed by ``seed``. Inputs [n, in], targets [n, out]
    (``split`` as for :func:`digits`: a fixed held-out part of the ``n`` samples, or the rest)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    w1 = torch.randn(in_features, 16, generator=gen) / in_features**0.5
    w2 = torch.randn(16, out_features, generator=gen) / 4.0
    y = torch.tanh(x @ w1) @ w2 + noise * torch.randn(n, out_features, generator=gen)
    kept = split_indices(n, split, test_fraction)
    return TensorDataset(x[kept].contiguous(), y[kept].contiguous())


def synthetic_classification(
    n: int = 1024, in_features: int = 20, num_classes: int = 4, seed: int = 0, split: str = "all", test_fraction: float = 0.2
) -> TensorDataset:
    """Gaussian blobs around random class centres; fixed by ``seed``. Inputs [n, in], targets int64 [n]
    (``split`` as for :func:`digits`)."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, in_features, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = centres[y] + torch.randn(n, in_features, generator=gen)
    kept = split_indices(n, split, test_fraction)
    return TensorDataset(x[kept].contiguous(), y[kept].contiguous())


def constant(n: int = 3, in_features: int = 1, target: float = 5.0, seed: int = 0) -> TensorDataset:
    """Seed 001's setup: ``features = torch.rand((n, in_features))`` and a scalar target per sample."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, in_features, generator=gen)
    return TensorDataset(x, torch.full((n, 1), float(target)))


DATASETS: dict[str, Callable[..., TensorDataset]] = {
    "digits": digits,
    "synthetic_regression": synthetic_regression,
    "synthetic_classification": synthetic_classification,
    "constant": constant,
}
