"""A finished trial's evaluation and model in its run, once: metrics, check tags, the report and
plots, the checkpoint, and P' as an MLflow PyTorch (pt2) model with a dynamic batch dimension."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ancra_tune.robustness.report import EvalReport

from .runs import EpochLogger
from .store import FINAL_LOGGED, MODEL_URI, REPORT_ARTIFACT, client, log_metrics

log = logging.getLogger(__name__)

def log_trial_result(uri: str, run_id: str, *, metrics: Mapping[str, Any], report: EvalReport,
                     files: Iterable[Path], model: Any, input_shape: tuple[int, ...], checkpoint: Path,
                     step: int) -> None:
    """The trial's evaluation and model, once: metrics, check tags, report and plots, the
    checkpoint and an MLflow PyTorch (pt2) model of the final prediction P'.

    Every part is idempotent, so a run interrupted in the middle of it completes on restart
    without a second value or a second model."""
    mc = client(uri)
    run = mc.get_run(run_id)
    if run.data.tags.get(FINAL_LOGGED) == "true":
        return
    have = set(run.data.metrics)
    log_metrics(mc, run_id, {k: v for k, v in metrics.items() if k not in have}, step=step)
    from mlflow.entities import RunTag

    mc.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in report.tags().items()])
    with tempfile.TemporaryDirectory() as d:  # artifacts overwrite themselves: idempotent
        saved = report.save(Path(d, REPORT_ARTIFACT.rsplit("/", 1)[1]))
        mc.log_artifact(run_id, str(saved), artifact_path="evaluation")
    for f in files:
        mc.log_artifact(run_id, str(f), artifact_path="evaluation")
    mc.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
    if MODEL_URI not in run.data.tags:
        ready = [m for m in mc.search_logged_models([run.info.experiment_id],
                                                    filter_string=f"source_run_id = '{run_id}'")
                 if str(m.status) == "READY"]
        model_uri = ready[0].model_uri if ready else log_model(uri, run_id, model, input_shape)
        mc.set_tag(run_id, MODEL_URI, model_uri)
    mc.set_tag(run_id, FINAL_LOGGED, "true")


def log_trial_folder(uri: str, run_id: str, folder: Path, *, epochs: int) -> None:
    """Log a finished Train run's evaluation and model from its last checkpoint folder
    (checkpoint.pt, final.json, report.json, PNGs): used by rank 0 at the trial's end and by the
    driver to deliver what an MLflow outage held back."""
    from ancra_tune.checkpoint import load_model

    from ..trial_rows import FINAL_NAME, REPORT_NAME, metrics_of

    model, _, info = load_model(folder / "checkpoint.pt")  # plain BatchNorm, on CPU
    final = json.loads((folder / FINAL_NAME).read_text())
    log_trial_result(uri, run_id, metrics=metrics_of(final), report=EvalReport.load(folder / REPORT_NAME),
                     files=sorted(folder.glob("*.png")), model=model,
                     input_shape=(info.in_channels, info.image_size, info.image_size),
                     checkpoint=folder / "checkpoint.pt", step=epochs)


def run_is_complete(mc: Any, run_id: str, *, epochs: int, finished: bool) -> bool:
    """Whether the run already holds ``epochs`` epochs and, for a finished trial, its evaluation."""
    run = mc.get_run(run_id)
    if finished and run.data.tags.get(FINAL_LOGGED) != "true":
        return False
    return len(mc.get_metric_history(run_id, EpochLogger.KEY)) >= epochs


def log_model(uri: str, run_id: str, model: Any, input_shape: tuple[int, ...]) -> str:
    """Log P' as a torch.export (pt2) program with a dynamic batch dimension; returns its URI."""
    import copy

    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ancra_tune.robustness import LogitsOnly

    core = copy.deepcopy(model).cpu().eval()
    wrapped = LogitsOnly(core).eval()  # ModelOutput is a dataclass: export the logits only
    example = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)  # batch > 1: dynamic
    with torch.no_grad():
        n_classes = int(wrapped(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "images")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), "logits")]))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
        # No serving-input check: MLflow would load the model again and feed it the example as JSON
        # lists, which the PyTorch flavor refuses (a warning in every trial's log, 0.1-0.5 s each).
        # The test of this function loads the logged model and compares its predictions instead.
        info = mlflow.pytorch.log_model(wrapped, name="model", signature=signature, input_example=example,
                                        serialization_format="pt2", pip_requirements=_requirements(),
                                        validate_serving_input=False)
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"mlflow=={version('mlflow')}"]
