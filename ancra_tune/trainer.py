"""The ANCRA trainer in pure PyTorch: one step (:func:`ancra_step`) and the epoch loop
(:class:`Trainer`) with validation, checkpoints that resume exactly, and callbacks.

Distributed training wraps this (see ``trainables/``): the step takes the possibly
DDP-wrapped model for the loss and crafts AEs/OEs on the bare module; the loader
shards batches by rank; metrics and checkpoints leave through :class:`Callback`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from . import metric_names as M
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    build_model,
    data_info_to_dict,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)
from .config import TrainConfig
from .data import ArrayData, BatchLoader, DataSplits, epoch_generator, load_dataset
from .distributed import all_true, is_distributed
from .step import ancra_step, resolved_method
from .validation import clean_accuracy, pgd_correct

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
PARTIAL_NAME = "partial_epoch.pt"  # not checkpoint.pt: never taken for a finished epoch's checkpoint


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, step {step}: loss = {value}")
        self.epoch, self.step, self.value = epoch, step, value


class Callback:
    """Hooks the trainer calls on every worker; override what you need (Ray, MLflow)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float],
                     checkpoint: Path | None) -> None:
        """After ``epoch`` (0-based). On rank 0, ``metrics`` include validation and ``checkpoint``
        is the file just written; on other ranks they hold the worker's training numbers only."""

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the last epoch."""

    def on_mid_epoch_checkpoint(self, trainer: Trainer, epoch: int, step: int, steps: int) -> None:
        """On rank 0, after a mid-epoch checkpoint of ``epoch`` (0-based) was written: ``step`` of the
        epoch's ``steps`` are done (``config.checkpoint_every_s``)."""


class PartialStore:
    """Where a run keeps its mid-epoch checkpoint (one file, replaced atomically). :class:`PartialFile`
    is a local file; a Ray trial keeps it in the study's storage (``trainables.worker``)."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self) -> bytes | None:
        """The file's bytes, or None when there is none."""
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def save(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"format_version": FORMAT_VERSION, **state}, buf)
        self.write(buf.getvalue())

    def load(self, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The saved state (plain tensors and builtins only, never unpickled code), or None when there
        is none or it cannot be read (a warning: the run then resumes at its last epoch's end)."""
        data = self.read()
        if data is None:
            return None
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the epoch's start
            log.warning("mid-epoch checkpoint %s unreadable, ignored (%s)", self, str(e).splitlines()[0][:200])
            return None
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            log.warning("mid-epoch checkpoint %s is not one this version writes, ignored", self)
            return None
        return state


class PartialFile(PartialStore):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def write(self, data: bytes) -> None:
        write_atomic(self.path, data)

    def read(self) -> bytes | None:
        return self.path.read_bytes() if self.path.is_file() else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# Where the data was read from, not what it is: a checkpoint that records its training data's digest
# resumes wherever the same data lives (another machine, another folder).
_DATA_LOCATION = ("root", "train_file", "test_file")


def _training_part(cfg: TrainConfig) -> dict[str, Any]:
    """What decides the weights an epoch trains, besides its data (:meth:`Trainer._data_differs`): a
    mid-epoch checkpoint resumes only under it."""
    d = cfg.to_dict()
    return {"method": resolved_method(cfg.method), **{k: d[k] for k in ("model", "attack", "optim", "seed",
                                                                          "precision")}}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The released step schedule for 0-based ``epoch``: lr / 10 from epochs 75, 90 and 100 counted
    from 1 (74/15/10/21 epochs at each lr over 120), scaled to ``optim.epochs``."""
    o = cfg.optim
    return o.lr * o.lr_decay ** sum(epoch + 1 >= m for m in o.milestone_epochs())


class Trainer:
    """Trains one configuration; ``fit`` runs the remaining epochs and returns the last metrics.

    Files in ``out_dir`` (rank 0): ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per
    epoch, appended as it ends) and ``checkpoint.pt`` (written after every epoch, atomically).
    """

    def __init__(self, cfg: TrainConfig, *, splits: DataSplits | None = None,
                 callbacks: Sequence[Callback] = (), device: torch.device | str | None = None,
                 rank: int = 0, world_size: int = 1, out_dir: str | Path | None = None,
                 wrap_model: Any = None, partial: PartialStore | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.rank, self.world_size = rank, world_size
        self.out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
        self.callbacks = list(callbacks)
        self.splits = splits if splits is not None else load_dataset(cfg.data)
        seed_everything(cfg.seed)  # weights depend on the seed only
        self.model = build_model(cfg, self.splits.info).to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # The seam for DDP: the loss runs through the wrapper, attacks on the bare model.
        self.train_model: nn.Module = wrap_model(self.model) if wrap_model is not None else self.model
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        # The mid-epoch checkpoint (config.checkpoint_every_s): rank 0 writes it, every rank reads it.
        self.partial = partial if partial is not None else PartialFile(self.out_dir / PARTIAL_NAME)
        self._partial_state: dict[str, Any] | None = None  # what resume_partial loaded, for start_epoch
        self._data_digest: str | None = None

    # ----------------------------------------------------------------- state

    @property
    def data_digest(self) -> str:
        """The training split's digest (:meth:`ArrayData.digest`), computed once."""
        if self._data_digest is None:
            self._data_digest = self.splits.train.digest()
        return self._data_digest

    def _data_differs(self, state: dict[str, Any]) -> str | None:
        """Why the data of a checkpoint's ``state`` is not this run's, or None. With its digest (written
        since checkpoints record one) the data may have moved; without, it must be where it was."""
        saved = TrainConfig.from_dict(state["config"]).data
        if "data_digest" not in state:
            return None if saved == self.cfg.data else "its data settings differ"
        here = {k: getattr(self.cfg.data, k) for k in _DATA_LOCATION}
        if dataclasses.replace(saved, **here) != self.cfg.data:
            return "its data settings differ"
        if state["data_digest"] != self.data_digest:
            return (f"its training data differs from this run's (read then from "
                    f"{ {k: getattr(saved, k) for k in _DATA_LOCATION} }, now from {here})")
        return None

    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "config": self.cfg.to_dict(), "data_info": data_info_to_dict(self.splits.info),
                "data_digest": self.data_digest, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state.get("history", []))
        self.start_epoch = int(state["epoch"]) + 1

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default: ``out_dir/checkpoint.pt``) if it exists; True if loaded."""
        p = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        if not p.is_file():
            return False
        state = load_checkpoint(p, map_location=self.device)
        saved = TrainConfig.from_dict(state["config"])
        if saved.model != self.cfg.model or resolved_method(saved.method) != resolved_method(self.cfg.method):
            raise ValueError(f"{p} was written by a different configuration; refusing to resume from it")
        why = self._data_differs(state)
        if why is not None:
            raise ValueError(f"{p} was written by a different configuration ({why}); refusing to resume from it")
        self.load_state_dict(state)
        log.info("resumed from %s at epoch %d", p, self.start_epoch)
        return True

    def resume_partial(self) -> bool:
        """Continue ``start_epoch`` from its mid-epoch checkpoint, if one of this run is there (after
        :meth:`resume`, or at a run's start): True if loaded. Training then goes on exactly as if
        never stopped (the model, optimizer, random streams and the epoch's sums are restored and
        the data order skips the batches done). One of another epoch, world size or configuration
        is ignored with a warning."""
        state = self.partial.load(self.device)
        if state is None:
            return False
        why = None
        if int(state.get("epoch", -1)) != self.start_epoch:
            why = f"it is of epoch {int(state.get('epoch', -1)) + 1}, the run resumes at epoch {self.start_epoch + 1}"
        elif int(state.get("world_size", 0)) != self.world_size:
            why = f"it was written by {state.get('world_size')} worker(s), this run has {self.world_size}"
        elif _training_part(TrainConfig.from_dict(state["config"])) != _training_part(self.cfg):
            why = "it was written by a different configuration"
        elif (data := self._data_differs(state)) is not None:
            why = f"it was written by a different configuration ({data})"
        if why is not None:
            log.warning("mid-epoch checkpoint %s ignored: %s", self.partial, why)
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state.get("history", []))
        self._partial_state = state
        log.info("resumed epoch %d at step %d from %s", self.start_epoch + 1, int(state["step"]), self.partial)
        return True

    def _save_partial(self, epoch: int, step: int, gen: torch.Generator, sums: dict[str, Tensor],
                      steps: int, images: int, elapsed: float) -> None:
        """Every rank takes part (its random streams and sums are gathered); rank 0 writes."""
        mine: dict[str, Any] = {"gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                "sums": {k: v.detach().cpu() for k, v in sums.items()}}
        if self.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ranks: list[Any] = [mine]
        if is_distributed():
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
        if self.rank != 0:
            return
        self.partial.save({"epoch": epoch, "step": step, "world_size": self.world_size,
                           "config": self.cfg.to_dict(), "data_digest": self.data_digest,
                           "model": self.model.state_dict(),
                           "optimizer": self.optimizer.state_dict(), "history": self.history,
                           "ranks": ranks, "steps": steps, "images": images, "elapsed": elapsed})

    # ----------------------------------------------------------------- loop

    def _loader(self) -> BatchLoader:
        return BatchLoader(self.splits.train, batch_size=self.cfg.data.batch_size, shuffle=True,
                           augment=self.splits.augment, drop_last=True, seed=self.cfg.seed,
                           rank=self.rank, world_size=self.world_size, device=self.device)

    def train_epoch(self, epoch: int, loader: BatchLoader | None = None,
                    resume: dict[str, Any] | None = None) -> dict[str, float]:
        """One epoch; from a mid-epoch checkpoint's state (``resume``, see :meth:`resume_partial`)
        it goes on at the step that state reached."""
        loader = loader or self._loader()
        lr = lr_at(self.cfg, epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        gen = epoch_generator(self.cfg.seed, epoch, stream=2)  # negatives and attack starts
        sums: dict[str, Tensor] = {}
        steps, images, start, before = 0, 0, 0, 0.0
        if resume is not None:
            mine = resume["ranks"][self.rank]
            gen.set_state(mine["gen"])
            torch.set_rng_state(mine["torch_rng"])
            if "cuda_rng" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
            sums = {k: v.to(self.device) for k, v in mine["sums"].items()}
            start, steps, images = int(resume["step"]), int(resume["steps"]), int(resume["images"])
            before = float(resume["elapsed"])
        loader.set_epoch(epoch, start)
        every = self.cfg.checkpoint_every_s
        t0 = last_saved = time.perf_counter()
        bar = self._progress(loader, epoch, start)
        to_nhwc = self.cfg.channels_last and self.device.type == "cuda"
        for step, (x, y) in enumerate(bar, start=start):
            if to_nhwc:  # inputs in the weights' memory format: no layout conversion per convolution
                x = x.contiguous(memory_format=torch.channels_last)
            loss, parts = ancra_step(self.train_model, x, y, cfg=self.cfg, epoch=epoch, generator=gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            steps += 1
            images += x.shape[0]
            if step % 10 == 0:  # a host sync: only every few steps
                value = loss.item()
                # Collective: every worker stops at the same step, or none does (no DDP hang).
                if not all_true(math.isfinite(value), self.device):
                    raise DivergedError(epoch, step, value)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}")
                # A mid-epoch checkpoint when due (rank 0's clock decides for every worker), unless
                # the epoch's own checkpoint comes next.
                due = every > 0 and time.perf_counter() - last_saved >= every and step + 1 < len(loader)
                if every > 0 and is_distributed():  # every rank has the same setting: no collective when off
                    due = not all_true(not due, self.device)
                if due:
                    self._save_partial(epoch, step + 1, gen, sums, steps, images,
                                       before + time.perf_counter() - t0)
                    last_saved = time.perf_counter()
                    if self.rank == 0:
                        for cb in self.callbacks:
                            cb.on_mid_epoch_checkpoint(self, epoch, step + 1, len(loader))
        elapsed = before + time.perf_counter() - t0
        if is_distributed() and sums:  # report the global batch's numbers, not one shard's
            keys = sorted(sums)
            stacked = torch.stack([sums[k].float() for k in keys])
            torch.distributed.all_reduce(stacked)
            sums = dict(zip(keys, stacked / self.world_size, strict=True))
        means = {k: v.item() / max(1, steps) for k, v in sums.items()}
        if not all_true(math.isfinite(means.get("loss", 0.0)), self.device):
            raise DivergedError(epoch, steps - 1, means.get("loss", float("nan")))
        means.update({M.LR: lr, M.EPOCH_TIME_S: elapsed, M.TRAIN_IMAGES_PER_S: images * self.world_size / elapsed})
        if start:
            means[M.RESUMED_AT_STEP] = float(start)
        return means

    def eval_split(self) -> tuple[str, ArrayData]:
        """(metric prefix, data) of the per-epoch metrics: the held-out validation split, or the
        test split when ``eval.split`` is test (the released code evaluates the test set)."""
        if self.cfg.eval.split == "test":
            if self.splits.test is None:
                raise ValueError("eval.split = 'test' but the dataset as configured has no test split")
            return "test", self.splits.test
        return "val", self.splits.val

    def validate(self) -> dict[str, float]:
        """Clean accuracy and PGD accuracy of P' under attacks on P' and, with RA, on the auxiliary
        P and through the soft surrogate of the gate: each metric names what it attacked.
        ``<split>_robust_acc`` counts examples that survive all of them."""
        c, model = self.cfg, self.model
        prefix, data = self.eval_split()
        if len(data) == 0:
            return {}
        kw = dict(batch_size=c.data.eval_batch_size, device=self.device)
        out = {M.clean_acc(prefix): clean_accuracy(model, data, **kw)}
        if c.eval.pgd_steps > 0:
            sub = data.subset(torch.arange(min(len(data), c.eval.max_examples)))
            worst = None
            for target in (M.VALIDATION_TARGETS if model.ra else ("final",)):
                correct = pgd_correct(model, sub, target=target, eps=c.attack.eps, step_size=c.eval.pgd_step_size,
                                      steps=c.eval.pgd_steps, seed=c.seed, **kw)
                out[M.pgd_acc(prefix, target)] = correct.float().mean().item()
                worst = correct if worst is None else worst & correct
            assert worst is not None
            out[M.robust_acc(prefix)] = worst.float().mean().item()
        return out

    def fit(self, *, resume: bool = False) -> dict[str, float]:
        """Train from ``start_epoch`` (after ``resume``) to ``optim.epochs``; return the last metrics."""
        if resume:
            self.resume()
            self.resume_partial()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        loader = self._loader()
        metrics: dict[str, float] = self.history[-1] if self.history else {}
        partial, self._partial_state = self._partial_state, None
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            metrics = {"epoch": float(epoch), **self.train_epoch(epoch, loader, partial)}
            partial = None
            path = None
            if self.rank == 0:
                t_val = time.perf_counter()
                metrics.update(self.validate())
                metrics[M.VAL_TIME_S] = time.perf_counter() - t_val
                self.history.append(metrics)
                with open(self.out_dir / METRICS_NAME, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                path = save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.state_dict(epoch))
                self._log_epoch(epoch, metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics, path)
            if self.rank == 0:  # the epoch's checkpoint is out (reported): its mid-epoch one is stale
                self.partial.remove()
        for cb in self.callbacks:
            cb.on_train_end(self, metrics)
        return metrics

    # ----------------------------------------------------------------- display

    def _progress(self, loader: BatchLoader, epoch: int, start: int = 0) -> Any:
        if not self.cfg.progress or self.rank != 0:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", leave=False, dynamic_ncols=True,
                    initial=start, total=len(loader))

    def _log_epoch(self, epoch: int, m: dict[str, float]) -> None:
        p = self.eval_split()[0]
        keys = (M.LOSS, M.TRAIN_ADV_ACC, M.clean_acc(p), M.pgd_acc(p, "final"), M.robust_acc(p),
                M.NEG_FALLBACK_RATE, M.EPOCH_TIME_S)
        text = "  ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
        msg = f"epoch {epoch + 1}/{self.cfg.optim.epochs}  {text}"
        if self.cfg.progress:
            print(msg, flush=True)
        log.info(msg)
