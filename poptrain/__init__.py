"""poptrain: train a population of PyTorch models together on Ray, coupled through a coordinator,
tracked in MLflow (one parent run per population, one nested run per member).

    import poptrain
    result = poptrain.run("configs/prelu_separation.yaml", overrides=["steps=100"])
    result.run_id, result.output_dir, result.metrics

Names are imported lazily so that processes needing only part of poptrain (``poptrain check``
imports neither Ray nor MLflow) start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "poptrain.config",
    "RunConfig": "poptrain.config",
    "load_config": "poptrain.config",
    "Coupling": "poptrain.couplings",
    "Quantity": "poptrain.couplings",
    "register": "poptrain.couplings",
    "coupling_function": "poptrain.couplings",
    "PopulationError": "poptrain.driver.population",
    "RunResult": "poptrain.driver.population",
    "run": "poptrain.driver.population",
    "resume": "poptrain.driver.population",
    "release_warm_members": "poptrain.driver.pool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'poptrain' has no attribute {name!r}")
