"""Log a member's final model into its MLflow run with ``mlflow.pytorch.log_model`` (MLflow 3).

MLflow 3 facts this module relies on (mlflow 3.17, checked here):

* ``log_model(model, name=...)``: ``artifact_path=`` is deprecated. Each call logs a
  **LoggedModel** entity (id ``m-...``, URI ``models:/<id>``) with its own artifact folder
  (``<experiment artifact root>/models/<id>/artifacts``). Given ``run_id=``, it links the model
  to the run as an output and copies the run's metrics at ``step`` onto it, fetching the whole
  history of every metric key of the run to do so. ``mlflow.pytorch.load_model(info.model_uri)``
  loads it back. poptrain tags it ``poptrain.member`` and ``poptrain.population_run`` (the
  parent run id): ``search_logged_models(filter_string="tags.`poptrain.population_run` = '<id>'")``
  lists one population's models.
* Nothing needs an active run. Left to itself, MLflow creates the LoggedModel in the *global*
  experiment (the Default experiment ``0`` here, not the run's) through the *global* tracking
  URI. So this module creates the LoggedModel itself in the run's experiment with
  ``source_run_id`` set, passes its ``model_id``, links it to the run as an output, and sets the
  global tracking URI only for the duration of the call (:func:`using_tracking_uri`; loading
  ``models:/...`` needs it too). ``run_id=`` (through ``log_model``'s ``**kwargs`` to
  ``Model.log``) is passed only with ``link_metrics`` (see :func:`log_member_model`).
* Serialization: MLflow's default off Databricks is ``pt2`` (``torch.export``): safe to load and
  needs no model code, but it loads back as a traced ``GraphModule`` that may only accept the
  example's shapes (an LSTM exported with sequences of length 5 refuses length 9: "Guard failed:
  inputs.size()[1] == 5"), and the first export in a process imports ``torch._dynamo`` (3 to 4 s).
  poptrain logs with ``pickle`` by default: ``load_model`` gives back the member's own
  ``nn.Module`` (``model.activation.weight`` and all), for any input shape; loading needs the
  model's class importable (poptrain's built-ins, or the user's module on the path). MLflow warns
  at every pickled model that unpickling runs code; poptrain says it once per process in its own
  log, with why it pickles, and drops MLflow's repeats (:func:`_pickle_said`). ``serialization_format="pt2"`` is available; a model
  ``torch.export`` cannot trace then falls back to ``pickle``.
* Without ``pip_requirements`` MLflow infers them by loading the model in a subprocess: 5 to 20 s
  per model here. They are given explicitly instead; one small model then logs in 0.2 to 0.3 s
  into a local HTTP server.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poptrain.config.schema import Component

log = logging.getLogger(__name__)
PICKLE_WARNING = "Saving pytorch model by Pickle"  # how MLflow's warning at every pickled model starts


class _SaidOnce(logging.Filter):
    """Drops MLflow's pickle warning, repeated at every member's model, after poptrain has said once
    in its own log why the format is used here and what loading one trusts (:func:`_pickle_said`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PICKLE_WARNING)


_said: list[bool] = []


@contextmanager
def _pickle_said():
    """Around a pickled model's save: MLflow's warning replaced by one line of poptrain's, once per process."""
    if not _said:
        _said.append(True)
        log.warning(
            "poptrain logs members' models with pickle so that mlflow.pytorch.load_model gives back each member's own nn.Module, "
            "for any input shape; loading one runs code, as any pickle does: load only the models of runs you trust (a member's "
            "model.pt beside its checkpoints is a state dict, loaded with weights_only=True). MLflow's warning to that effect is "
            "not repeated for every member."
        )
    logger, quiet = logging.getLogger("mlflow.pytorch"), _SaidOnce()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextmanager
def using_tracking_uri(uri: str):
    """Use ``uri`` as MLflow's global tracking URI for the duration, then restore the previous one.

    ``mlflow.set_tracking_uri`` also sets (or, given None, unsets) ``$MLFLOW_TRACKING_URI``, which
    poptrain itself reads: both are restored. Not thread-safe (MLflow's URI is process-global).
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)  # None: never set (not the resolved default)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]  # "2.13.0+cpu" is not on PyPI


def log_member_model(
    client_or_uri: Any,
    run_id: str,
    state_dict_path: str | Path,
    model_spec: Component | dict,
    input_example: Any,
    name: str = "model",
    step: int = 0,
    serialization_format: str = "pickle",
    link_metrics: bool = False,
):
    """Rebuild a member's model from ``model_spec`` and its saved state dict, and log it into ``run_id``.

    ``client_or_uri``: an ``MlflowClient`` or a tracking URI. ``input_example``: a few inputs of
    the model's single input (a tensor or array, batch > 1), stored as the example and used for
    the signature (and, for ``pt2``, to trace the model); None for a model of several inputs,
    which is logged without either. ``step``: the training step the model
    belongs to (the last one), recorded on the run's link to the model.

    ``link_metrics``: let MLflow copy the run's metrics at ``step`` onto the LoggedModel. It does so
    by fetching the whole history of every metric of the run, one request per key (13 for the
    seed-000 MLP with per-layer norms, hundreds for a deep model), so by default the model is only
    linked to the run as its output at ``step``, in one request. Returns MLflow's ``ModelInfo``
    (``model_uri``, ``model_id``); ``runs:/<run_id>/<name>`` resolves to the model as well.
    """
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import infer_signature

    from poptrain.components.build import build_model

    spec = model_spec if isinstance(model_spec, Component) else Component(**model_spec)
    uri = client_or_uri if isinstance(client_or_uri, str) else client_or_uri.tracking_uri
    client = MlflowClient(uri)
    started = time.monotonic()
    model = build_model(spec)
    model.load_state_dict(torch.load(state_dict_path, weights_only=True, map_location="cpu"))
    model.eval()
    if input_example is None:  # a model of several inputs: logged without an example or a signature
        example = signature = None
    else:
        example = (
            input_example.detach().cpu() if isinstance(input_example, torch.Tensor) else torch.as_tensor(np.array(input_example))
        )  # a copy: arrays from Ray are read-only
        with torch.no_grad():
            output = model(example)
        signature = infer_signature(example.numpy(), output.numpy() if isinstance(output, torch.Tensor) else None)
    run = client.get_run(run_id)

    def log_as(fmt: str):
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params={k: v for k, v in run.data.params.items()},
            tags={
                "poptrain.member": run.data.tags.get("poptrain.member", ""),
                "poptrain.population_run": run.data.tags.get("mlflow.parentRunId", ""),  # to rank one population's models
                "poptrain.serialization": fmt,
            },
        )
        try:
            with using_tracking_uri(uri), _pickle_said() if fmt == "pickle" else nullcontext():
                info = mlflow.pytorch.log_model(
                    model,
                    name=name,
                    model_id=logged.model_id,
                    run_id=run_id if link_metrics else None,  # through **kwargs to Model.log(run_id=...)
                    step=step,
                    input_example=None if example is None else example.numpy(),
                    signature=signature,
                    pip_requirements=_requirements(),
                    serialization_format=fmt,
                )
            if not link_metrics:
                client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step)])
            return info
        except Exception:
            try:
                client.delete_logged_model(logged.model_id)  # a FAILED model would only clutter the UI
            except Exception:
                pass
            raise

    try:
        info = log_as(serialization_format)
    except Exception as exc:
        if serialization_format != "pt2":
            raise
        log.warning("torch.export cannot trace %s (%s: %s); logging it with pickle instead", spec.name, type(exc).__name__, exc)
        info = log_as("pickle")
    log.info("logged %s into run %s as %s in %.2f s", spec.name, run_id, info.model_uri, time.monotonic() - started)
    return info
