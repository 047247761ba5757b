"""Honest robustness evaluation: the paper's attacks, AutoAttack, adaptive attacks on RA at
AutoAttack strength, gradient-masking checks that can fire, and feature analysis.

The package is split by concern: ``suite`` (settings and the attack plan), ``adaptive``
(surrogates of the RA gate, APGD on them, scoring on the real model), ``runner`` (attacks per
batch), ``checks`` (the masking checks), ``report`` (:class:`EvalReport`), ``plots``. This module
evaluates a checkpoint end to end.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checks import Check, zero_gradient_mask
from .kept import BatchRunner, KeptBatches, LocalBatchFiles, OnBatch, evaluate_kept, model_digest
from .report import AttackResult, BatchResult, EvalReport, build_report, feature_pairs, format_report
from .runner import LogitsOnly, batch_slices, evaluate_model, run_attack, run_batch
from .suite import PRESETS, SURROGATES, TARGETS, AttackSpec, SuiteConfig, plan_attacks

__all__ = [
    "PRESETS", "SURROGATES", "TARGETS", "AttackResult", "AttackSpec", "BatchResult", "BatchRunner", "Check",
    "EvalReport", "LogitsOnly", "SuiteConfig", "batch_slices", "build_report", "evaluate_checkpoint",
    "evaluate_deployment", "evaluate_model", "feature_pairs", "format_report", "load_eval_data", "plan_attacks",
    "run_attack", "run_batch", "seeded_subset", "zero_gradient_mask",
]

def seeded_subset(n_total: int, n: int | None, seed: int) -> Tensor:
    """The first ``n`` examples of a fixed permutation: the same examples every time."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def load_eval_data(train_cfg: Any, split: str, data_root: str | None = None) -> tuple[Tensor, Tensor]:
    """The checkpoint's validation split (as held out in training) or its test split, in [0, 1]."""
    from ..data import load_dataset

    data_cfg = train_cfg.data if data_root is None else replace(train_cfg.data, root=data_root)
    splits = load_dataset(data_cfg)
    if split == "val":
        data = splits.val
    elif split == "test":
        if splits.test is None:
            raise ValueError(f"dataset {data_cfg.dataset!r} as configured has no test split (set data.test_file)")
        data = splits.test
    else:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if len(data) == 0:
        raise ValueError(f"the {split} split is empty (data.val_size = 0?): evaluate --split test instead")
    return data.images.float().div(255.0), data.labels


def _prepare(path: str | Path, cfg: SuiteConfig, *, split: str, source: str | Path | None, device: str,
             data_root: str | None) -> tuple[Any, Any, Any, Tensor, Tensor, Any, dict[str, Any], Tensor]:
    from ..checkpoint import load_model

    dev = torch.device(device)
    model, train_cfg, info = load_model(path, map_location=dev)
    x, y = load_eval_data(train_cfg, split, data_root)
    idx = seeded_subset(x.shape[0], cfg.n_examples, cfg.seed)
    src = None
    if source is not None:
        from ..checkpoint import CheckpointError

        src, _, src_info = load_model(source, map_location=dev)
        if (src_info.num_classes, src_info.in_channels, src_info.image_size) != \
                (info.num_classes, info.in_channels, info.image_size):
            raise CheckpointError(
                f"--source {source} was trained for {src_info.num_classes} classes of {src_info.in_channels}x"
                f"{src_info.image_size}x{src_info.image_size} images, {path} for {info.num_classes} of "
                f"{info.in_channels}x{info.image_size}x{info.image_size}: transfer attacks need the same task")
    meta = {"checkpoint": str(path), "split": split, "source": str(source) if source else None,
            "model": train_cfg.model.name, "dataset": train_cfg.data.dataset}
    return model, train_cfg, info, x[idx], y[idx], src, meta, idx


def _attacks(model: Any, x: Tensor, y: Tensor, cfg: SuiteConfig, *, src: Any, idx: Tensor, split: str,
             progress: bool, run: BatchRunner | None, keep: str | Path | None,
             on_batch: OnBatch | None) -> list[BatchResult]:
    """Every batch's results, each kept in the folder ``keep`` as it finishes (a stopped evaluation
    goes on from its next batch): here, or by ``run`` (e.g. over Ray workers)."""
    kept = KeptBatches(LocalBatchFiles(keep)) if keep is not None else None
    meta = {"model": model_digest(model), "ra": bool(model.ra), "suite": cfg.to_dict(), "split": split,
            "examples": idx.tolist(), "source": model_digest(src) if src is not None else None}
    results, *_ = evaluate_kept(model, x, y, cfg, kept=kept, meta=meta, source=src, on_batch=on_batch,
                                progress=progress, run=run)
    return results


def evaluate_checkpoint(path: str | Path, cfg: SuiteConfig, *, split: str = "val", source: str | Path | None = None,
                        out_dir: str | Path | None = None, device: str = "cpu", data_root: str | None = None,
                        progress: bool = True, run: BatchRunner | None = None, keep: str | Path | None = None,
                        on_batch: OnBatch | None = None) -> EvalReport:
    """The full evaluation of a checkpoint; with ``out_dir`` its ``report.json`` and PNGs go there.

    ``run``: runs the batches, yielding each as it finishes (a :data:`BatchRunner`; default: here,
    one after another); ``trainables.distributed_eval`` has one that spreads them over Ray workers.
    ``keep``: a folder where each finished batch is kept, so that a stopped
    evaluation of the same model, suite and examples goes on from its next batch with the outcomes
    an unstopped one gets (:mod:`.kept`); emptied once the report is out. ``on_batch`` hears how far
    it is, at its start and after each batch.
    """
    model, _, info, x, y, src, meta, idx = _prepare(path, cfg, split=split, source=source, device=device,
                                                    data_root=data_root)
    out = Path(out_dir) if out_dir is not None else None
    results = _attacks(model, x, y, cfg, src=src, idx=idx, split=split, progress=progress, run=run,
                       keep=keep, on_batch=on_batch)
    report = build_report(results, cfg, ra=model.ra, n_classes=info.num_classes, has_source=src is not None,
                          meta={**meta, "variant": "standard"})
    if out is not None:
        from .plots import draw_report  # matplotlib loads only when figures are drawn

        report = draw_report(report, results, out)
        report.save(out / "report.json")
    if keep is not None:
        LocalBatchFiles(keep).clear()
    return report


def evaluate_deployment(path: str | Path, cfg: SuiteConfig, *, split: str = "val", source: str | Path | None = None,
                        out_dir: str | Path | None = None, device: str = "cpu", data_root: str | None = None,
                        progress: bool = True, run: BatchRunner | None = None, keep: str | Path | None = None,
                        on_batch: OnBatch | None = None) -> dict[str, EvalReport]:
    """Deployment RA (paper Fig. 7): a standard checkpoint with RA off and switched on, side by side
    (``report.json`` holds both). ``run``, ``keep``, ``on_batch``: as :func:`evaluate_checkpoint` (each
    variant's batches in a folder of its own)."""
    import json

    from ..checkpoint import load_model

    model, _, info, x, y, src, meta, idx = _prepare(path, cfg, split=split, source=source, device=device,
                                                    data_root=data_root)
    if model.ra:
        raise ValueError(f"{path} was trained with RA on; deployment RA (Fig. 7) applies to standard models")
    out = Path(out_dir) if out_dir is not None else None
    reports = {}
    for name, m in (("standard", model), ("deployment_ra", load_model(path, ra=True, map_location=device)[0])):
        results = _attacks(m, x, y, cfg, src=src, idx=idx, split=split, progress=progress, run=run,
                           keep=Path(keep) / name if keep is not None else None, on_batch=on_batch)
        reports[name] = build_report(results, cfg, ra=m.ra, n_classes=info.num_classes, has_source=src is not None,
                                     meta={**meta, "variant": name})
        if out is not None:
            from .plots import draw_report

            reports[name] = draw_report(reports[name], results, out / name)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"deployment": True,
                                                     **{k: r.to_dict() for k, r in reports.items()}}, indent=1))
    if keep is not None:
        LocalBatchFiles(keep).clear()
    return reports
