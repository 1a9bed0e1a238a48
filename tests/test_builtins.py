"""Built-in datasets: the data scikit-learn ships, read without scikit-learn's import cost."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def test_the_digits_are_exactly_scikit_learns_and_loading_them_does_not_import_it():
    from sklearn.datasets import load_digits

    from poptrain.builtins.data import digits, load_digits_arrays

    pixels, labels = load_digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
    inputs, targets = digits(view="full").tensors
    assert np.array_equal(inputs.numpy(), (bunch.data / 16.0).astype(np.float32)) and np.array_equal(targets.numpy(), bunch.target)

    # A member process pays about 2 s of CPU and 150 MiB for `import sklearn`: the digits need none of it.
    probe = "import sys; from poptrain.builtins.data import digits; digits(view='rows'); print(sorted(m for m in sys.modules if m.startswith('sklearn')))"
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
