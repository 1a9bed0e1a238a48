"""poptrain: train a population of PyTorch models together on Ray, coupled through a coordinator,
tracked in MLflow (one parent run per population, one nested run per member).

    import poptrain
    result = poptrain.run("configs/prelu_separation.yaml", overrides=["steps=100"])
    result.run_id, result.output_dir, result.metrics
"""

from poptrain.config import ConfigError, RunConfig, load_config
from poptrain.couplings import Coupling, Quantity, register
from poptrain.population import PopulationError, RunResult, run

__version__ = "0.1.0"
__all__ = ["ConfigError", "Coupling", "PopulationError", "Quantity", "RunConfig", "RunResult", "load_config", "register", "run"]
