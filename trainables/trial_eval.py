"""A trial's end-of-training evaluation on the validation split (rank 0), and its delivery: the final
row to Tune (with the checkpoint it belongs to) and the evaluation and model to MLflow, at most once."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ancra_tune.robustness import EvalReport, SuiteConfig
from ancra_tune.robustness.kept import BatchFiles, BatchRunner, KeptBatches, OnBatch, evaluate_kept, model_digest
from ancra_tune.trainer import CHECKPOINT_NAME, Trainer

from . import storage
from . import trial_rows as R
from .progress import ProgressFile
from .spare_cpus import for_trial as spare_cpus_for
from .tracking import TrialRecorder

if TYPE_CHECKING:
    from .worker import Session

log = logging.getLogger(__name__)

EVAL_BATCHES = "eval_batches"  # the folder of an evaluation's finished batches, in the trial's folder


class FsBatchFiles(BatchFiles):
    """Files in a folder of the study's storage, through the pyarrow filesystem Tune gives the trial."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs, self.folder = fs, folder

    def __str__(self) -> str:
        return self.folder

    def read(self, name: str) -> bytes | None:
        return storage.fs_read(self.fs, f"{self.folder}/{name}")

    def write(self, name: str, data: bytes) -> None:
        if not storage.fs_exists(self.fs, self.folder):
            self.fs.create_dir(self.folder)
        storage.fs_write(self.fs, f"{self.folder}/{name}", data)

    def clear(self) -> None:
        storage.fs_remove(self.fs, self.folder)


class EvalBatches(KeptBatches):
    """The batches an end-of-trial evaluation has finished, kept in the trial's folder of the study's
    storage as they finish (:mod:`ancra_tune.robustness.kept`): a trial stopped mid-evaluation goes
    on from its next batch. Removed once the evaluation has been reported."""

    def __init__(self, fs: Any, folder: str) -> None:
        super().__init__(FsBatchFiles(fs, folder))
        self.fs, self.folder = fs, folder


def report_final(trainer: Trainer, suite: SuiteConfig, session: Session, recorder: TrialRecorder | None, *,
                 objective: list[str] | tuple[str, ...], timing: dict[str, float] | None = None,
                 batches: EvalBatches | None = None, progress: ProgressFile | None = None) -> dict[str, Any]:
    """Evaluate the trained model (rank 0; its finished batches kept in ``batches`` and counted in
    ``progress`` as they finish) and report the trial's final row with the last checkpoint; the other
    ranks report an empty one."""
    if session.rank != 0:
        session.report({R.DIVERGED: 0, R.FINAL: 1})
        return {}
    with tempfile.TemporaryDirectory() as d:
        # The evaluation travels with the last checkpoint: its presence marks the run as complete.
        shutil.copy2(trainer.out_dir / CHECKPOINT_NAME, Path(d) / CHECKPOINT_NAME)
        spent: dict[str, float] = {}
        on_batch = progress.evaluating if progress is not None else None
        report = evaluate_trial(trainer, suite, plots_dir=Path(d) if recorder else None, spent=spent,
                                batches=batches, on_batch=on_batch, run=spare_cpus_for(trainer.model))
        # The attacks are the evaluation; drawing its plots for MLflow is tracking's time.
        timing = {**(timing or {}), R.TIMING_PREFIX + "eval_s": spent["attacks_s"],
                  R.TIMING_PREFIX + "plots_s": spent["report_s"],
                  R.TIMING_PREFIX + "eval_batches_resumed": spent["batches_resumed"],
                  R.TIMING_PREFIX + "eval_untimed_batches": spent["batches_untimed"],
                  R.TIMING_PREFIX + "eval_batches_helped": spent["batches_helped"]}
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
    if batches is not None:  # the evaluation is in the trial's checkpoint now
        batches.remove()
    if progress is not None:
        progress.remove()
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
                   spent: dict[str, float] | None = None, batches: EvalBatches | None = None,
                   on_batch: OnBatch | None = None, run: BatchRunner | None = None) -> EvalReport:
    """The end-of-trial suite on the validation split: the report trials are compared by. With
    ``plots_dir`` the feature histograms and embedding are drawn there. ``spent`` receives the
    seconds the attacks took (``attacks_s``, over every start), the report with its plots (``report_s``) and the
    batches taken from an earlier, stopped start (``batches_resumed``; ``batches_untimed``: those of
    them kept by d923040, whose time is not in ``attacks_s``): with ``batches`` each batch is
    kept as it finishes, and those an earlier start finished are not evaluated again. ``on_batch`` hears
    how far it is (:meth:`trainables.progress.ProgressFile.evaluating`'s arguments) when it starts and
    after each batch. ``run`` runs the batches (default: here, one after another); a
    :class:`trainables.spare_cpus.SpareCpus` lets a CPU nobody holds take some of them (the same
    outcomes; how many in ``spent``'s ``batches_helped``)."""
    from ancra_tune.robustness import build_report, seeded_subset
    from ancra_tune.robustness.plots import draw_report

    suite = dataclasses.replace(suite, features=suite.features and plots_dir is not None)
    val = trainer.splits.val
    idx = seeded_subset(len(val), suite.n_examples, suite.seed)
    x, y = val.images[idx].float().div(255.0), val.labels[idx]
    model = trainer.model.eval()
    meta = {"model": model_digest(model), "suite": suite.to_dict(), "examples": idx.tolist()}
    results, seconds, resumed, untimed = evaluate_kept(model, x, y, suite, kept=batches, meta=meta,
                                                       on_batch=on_batch, run=run)
    t_report = time.perf_counter()
    report = build_report(results, suite, ra=model.ra, n_classes=trainer.splits.info.num_classes,
                          has_source=False)
    if plots_dir is not None:
        report = draw_report(report, results, plots_dir)
    if spent is not None:
        # every batch's own time, those of an earlier start included: what the evaluation cost
        spent.update(attacks_s=seconds, report_s=time.perf_counter() - t_report, batches_resumed=float(resumed),
                     batches_untimed=float(untimed), batches_helped=float(len(getattr(run, "helped", ()))))
    return report
