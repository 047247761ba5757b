"""A trial's end-of-training evaluation on the validation split (rank 0), and its delivery: the final
row to Tune (with the checkpoint it belongs to) and the evaluation and model to MLflow, at most once."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ancra_tune.robustness import EvalReport, SuiteConfig
from ancra_tune.trainer import CHECKPOINT_NAME, Trainer

from . import trial_rows as R
from .tracking import TrialRecorder

if TYPE_CHECKING:
    from .worker import Session

log = logging.getLogger(__name__)


def report_final(trainer: Trainer, suite: SuiteConfig, session: Session, recorder: TrialRecorder | None, *,
                 objective: list[str] | tuple[str, ...], timing: dict[str, float] | None = None) -> dict[str, Any]:
    if session.rank != 0:
        session.report({R.DIVERGED: 0, R.FINAL: 1})
        return {}
    with tempfile.TemporaryDirectory() as d:
        # The evaluation travels with the last checkpoint: its presence marks the run as complete.
        shutil.copy2(trainer.out_dir / CHECKPOINT_NAME, Path(d) / CHECKPOINT_NAME)
        spent: dict[str, float] = {}
        report = evaluate_trial(trainer, suite, plots_dir=Path(d) if recorder else None, spent=spent)
        # The attacks are the evaluation; drawing its plots for MLflow is tracking's time.
        timing = {**(timing or {}), R.TIMING_PREFIX + "eval_s": spent["attacks_s"],
                  R.TIMING_PREFIX + "plots_s": spent["report_s"]}
        final = R.final_row(report, training_times(trainer), objective)
        (Path(d) / R.FINAL_NAME).write_text(json.dumps(final))
        report.save(Path(d) / R.REPORT_NAME)
        t = time.time()
        if recorder is not None:
            recorder.epochs(trainer.history)  # a last chance for epochs an outage held back
            track_final(recorder, Path(d), epochs=trainer.cfg.optim.epochs)
            final[R.MLFLOW_PENDING] = recorder.pending
        timing[R.TIMING_PREFIX + "track_s"] = time.time() - t
        timing[R.TIMING_PREFIX + "worker_end"] = time.time()
        session.report({**final, **timing}, checkpoint=Path(d))
    return {**final, **timing}


def track_final(recorder: TrialRecorder, folder: Path, *, epochs: int) -> None:
    """Log the evaluation and the model to the trial's MLflow run (at most once; never fatal: the
    driver delivers it from the checkpoint if MLflow is unreachable now)."""
    from .tracking import log_trial_folder

    rid = recorder.run_id()
    if rid is None:
        recorder.pending += 1
        return
    try:
        log_trial_folder(recorder.spec.uri, rid, folder, epochs=epochs)
    except Exception as e:  # noqa: BLE001 (the trial's result stays in Tune and its checkpoint)
        recorder.pending += 1
        recorder.error = f"{type(e).__name__}: {e}"[:300]
        log.warning("logging the evaluation to MLflow run %s failed: %s", rid, e)


def training_times(trainer: Trainer) -> dict[str, float]:
    epoch_times = [h["epoch_time_s"] for h in trainer.history if "epoch_time_s" in h]
    out = {"train_time_s": float(sum(epoch_times))}
    if epoch_times:
        out["epoch_time_s_mean"] = sum(epoch_times) / len(epoch_times)
    return out


def evaluate_trial(trainer: Trainer, suite: SuiteConfig, *, plots_dir: Path | None = None,
                   spent: dict[str, float] | None = None) -> EvalReport:
    """The end-of-trial suite on the validation split: the report trials are compared by. With
    ``plots_dir`` the feature histograms and embedding are drawn there. ``spent`` receives the
    seconds the attacks took (``attacks_s``) and the report with its plots (``report_s``)."""
    import dataclasses

    from ancra_tune.robustness import build_report, evaluate_model, seeded_subset
    from ancra_tune.robustness.plots import draw_report

    suite = dataclasses.replace(suite, features=suite.features and plots_dir is not None)
    val = trainer.splits.val
    idx = seeded_subset(len(val), suite.n_examples, suite.seed)
    x, y = val.images[idx].float().div(255.0), val.labels[idx]
    model = trainer.model.eval()
    t = time.perf_counter()
    results = evaluate_model(model, x, y, suite, progress=False)
    t_report = time.perf_counter()
    report = build_report(results, suite, ra=model.ra, n_classes=trainer.splits.info.num_classes,
                          has_source=False)
    if plots_dir is not None:
        report = draw_report(report, results, plots_dir)
    if spent is not None:
        spent.update(attacks_s=t_report - t, report_s=time.perf_counter() - t_report)
    return report
