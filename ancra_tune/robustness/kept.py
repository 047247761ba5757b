"""An evaluation that keeps each batch as it finishes, so a stopped one goes on from its next batch.

A full evaluation of a robust model takes hours on a small machine (a surviving example costs every
attack its whole budget). Each finished batch's per-example outcomes are kept (plain tensors and
builtins, with the seconds the batch took) beside a ``meta.json`` that ties them to one model (the
SHA-256 of its weights), one suite and one list of examples: an evaluation of anything else starts
over. Each batch's attacks draw their randomness from the batch's own index, so the outcomes of an
evaluation stopped and taken up are the ones an unstopped evaluation gets.

Where the files live is a :class:`BatchFiles`: a local folder here (``ancra-tune eval``), a trial's
folder of the study's storage in ``trainables`` (a shared path or a bucket).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import write_atomic
from .report import BatchResult
from .runner import batch_slices, evaluate_model
from .suite import SuiteConfig

log = logging.getLogger(__name__)

META_NAME = "meta.json"

#: told how far an evaluation is, when it starts and after each batch: (batches done, batches,
#: examples done, examples, seconds over every start, batches taken from an earlier start, examples
#: whose batch's time is known: batches kept by d923040 lack it)
OnBatch = Callable[[int, int, int, int, float, int, int], None]

#: runs an evaluation's batches ``(model, x, y, suite, source, batches)``, yielding each batch's
#: result with the seconds it took as it finishes, in any order: here one after another
#: (:func:`batches_here`), or spread over workers (``trainables.distributed_eval.RayEvaluator``)
BatchRunner = Callable[[Any, Tensor, Tensor, SuiteConfig, "nn.Module | None", list[int]],
                       Iterator[tuple[BatchResult, float]]]


class BatchFiles:
    """Named files in one folder, each replaced whole."""

    def read(self, name: str) -> bytes | None:
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        """Remove the folder and everything in it (if it is there)."""
        raise NotImplementedError


class LocalBatchFiles(BatchFiles):
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def __str__(self) -> str:
        return str(self.folder)

    def read(self, name: str) -> bytes | None:
        p = self.folder / name
        return p.read_bytes() if p.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self.folder / name, data)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def batch_name(b: int) -> str:
    return f"batch_{b:05d}.pt"


class KeptBatches:
    """The batches an evaluation has finished, in ``files``."""

    def __init__(self, files: BatchFiles) -> None:
        self.files = files

    def open(self, meta: Mapping[str, Any], n_batches: int) -> dict[int, tuple[BatchResult, float]]:
        """The finished batches of the evaluation ``meta`` describes, with the seconds each took (none,
        and the folder emptied, when they are of another)."""
        raw = self.files.read(META_NAME)
        if raw is None or json.loads(raw) != meta:
            self.files.clear()
            self.files.write(META_NAME, json.dumps(meta).encode())
            return {}
        done: dict[int, tuple[BatchResult, float]] = {}
        for b in range(n_batches):
            data = self.files.read(batch_name(b))
            if data is None:
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if "result" not in state:  # kept by d923040, which did not keep the batch's time
                    state = {"result": state, "seconds": 0.0}
                done[b] = BatchResult.from_state(state["result"]), float(state["seconds"])
            except Exception as e:  # noqa: BLE001 - an unreadable batch is evaluated again
                log.warning("evaluation batch %s of %s unreadable, evaluated again (%s)", b, self.files, e)
        return done

    def save(self, result: BatchResult, seconds: float) -> None:
        buf = io.BytesIO()
        torch.save({"result": result.to_state(), "seconds": seconds}, buf)
        self.files.write(batch_name(result.batch_idx), buf.getvalue())

    def remove(self) -> None:
        self.files.clear()


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's weights and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BatchNorm counts) too
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def batches_here(model: Any, x: Tensor, y: Tensor, suite: SuiteConfig, source: nn.Module | None,
                 batches: list[int], *, progress: bool = False) -> Iterator[tuple[BatchResult, float]]:
    """The batches one after another in this process (each batch's own bar, its attacks, when ``progress``)."""
    for b in batches:
        t = time.perf_counter()
        (result,) = evaluate_model(model, x, y, suite, source=source, progress=progress, batches=[b])
        yield result, time.perf_counter() - t


def evaluate_kept(model: Any, x: Tensor, y: Tensor, suite: SuiteConfig, *, kept: KeptBatches | None,
                  meta: Mapping[str, Any], source: nn.Module | None = None, on_batch: OnBatch | None = None,
                  progress: bool = False, run: BatchRunner | None = None) -> tuple[list[BatchResult], float, int, int]:
    """:func:`evaluate_model` one batch at a time, each kept in ``kept`` as it finishes and those an
    earlier start finished (of the evaluation ``meta`` describes) taken from there; ``run`` runs the
    others (default: here, in order). Returns the batches' results, the seconds they took over every
    start, how many came from an earlier one, and how many of those have no time (kept by d923040)."""
    slices = batch_slices(x.shape[0], suite.batch_size)
    n = len(slices)
    done = kept.open(meta, n) if kept is not None else {}
    resumed = len(done)
    if resumed:
        log.info("evaluation: %d of %d batches finished before (%s), going on from there", resumed, n, kept.files)

    def tell() -> None:
        if on_batch is not None:
            size = {b: slices[b].stop - slices[b].start for b in done}
            on_batch(len(done), n, sum(size.values()), x.shape[0], sum(sec for _, sec in done.values()), resumed,
                     sum(size[b] for b, (_, sec) in done.items() if sec > 0))

    tell()
    todo = [b for b in range(n) if b not in done]
    results = run(model, x, y, suite, source, todo) if run is not None else \
        batches_here(model, x, y, suite, source, todo, progress=progress)
    try:
        for result, seconds in results:
            done[result.batch_idx] = result, seconds
            if kept is not None:
                kept.save(result, seconds)
            tell()
    finally:
        close = getattr(results, "close", None)  # a generator's: a stop here calls off the runner's work in flight
        if close is not None:
            close()
    return ([done[b][0] for b in range(n)], sum(sec for _, sec in done.values()), resumed,
            sum(sec <= 0 for _, sec in done.values()))
