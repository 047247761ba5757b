"""Checkpoints: plain tensors and builtins only, read with ``torch.load(weights_only=True)``
so that opening a checkpoint never executes code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import DataInfo
from .models import RANet, create_model

FORMAT_VERSION = 1


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` whole (written beside, then renamed): a reader never sees a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


class CheckpointError(ValueError):
    """A file or folder that is not a usable ancra-tune checkpoint; the message says why."""


CHECKPOINT_NAME = "checkpoint.pt"


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a path names: the file itself; a folder holding ``checkpoint.pt`` (a
    training output folder, a Ray checkpoint directory); or a folder with several below it (a Tune
    trial or Train run folder): the one of the finished run (beside its ``final.json``), else the
    newest. What ``ancra-tune sweep``, ``best`` and ``train`` print is what this takes."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if (p / CHECKPOINT_NAME).is_file():
        return p / CHECKPOINT_NAME
    found = sorted(p.rglob(CHECKPOINT_NAME), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {CHECKPOINT_NAME} in {p} or below it: pass a checkpoint file, a training "
                                "output folder, a Ray checkpoint folder or a trial folder")
    finished = [f for f in found if (f.parent / "final.json").is_file()]
    return (finished or found)[-1]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a file or any folder :func:`find_checkpoint` resolves). Only plain tensors
    and builtins are accepted: a file holding pickled Python objects is refused, never unpickled."""
    import pickle
    import zipfile

    path = find_checkpoint(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is not a checkpoint: it is not a PyTorch file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} is refused: it holds pickled Python objects, not only tensors and builtins; ancra-tune "
                "reads checkpoints as plain tensors and never runs code from a file") from None
        raise CheckpointError(f"{path} is not a checkpoint: it is not a PyTorch file ({e})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a checkpoint: it is not a PyTorch file "
                              f"({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an ancra-tune checkpoint (format {FORMAT_VERSION})")
    return state


def data_info_to_dict(info: DataInfo) -> dict[str, Any]:
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size,
            "mean": list(info.mean), "std": list(info.std), "classes": list(info.classes)}


def data_info_from_dict(d: dict[str, Any]) -> DataInfo:
    return DataInfo(num_classes=int(d["num_classes"]), in_channels=int(d["in_channels"]),
                    image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                    classes=tuple(d["classes"]))


def build_model(cfg: TrainConfig, info: DataInfo, *, ra: bool | None = None) -> RANet:
    """The model of ``cfg`` for data described by ``info``; ``ra`` overrides ``cfg.model.ra``."""
    return create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std, ra=cfg.model.ra if ra is None else ra,
                        ra_feed_weighted=cfg.model.ra_feed_weighted)


def load_model(path: str | Path, *, ra: bool | None = None,
               map_location: str | torch.device = "cpu") -> tuple[RANet, TrainConfig, DataInfo]:
    """The trained model of a checkpoint, in eval mode.

    ``ra=True`` on a checkpoint trained without RA is the paper's deployment RA (Fig. 7):
    RA adds no parameters, so the standard weights load unchanged into the RA model.
    """
    state = load_checkpoint(path, map_location)
    cfg = TrainConfig.from_dict(state["config"])
    info = data_info_from_dict(state["data_info"])
    model = build_model(cfg, info, ra=ra)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        expected, saved = model.state_dict(), state["model"]
        missing = [k for k in expected if k not in saved]
        unexpected = [k for k in saved if k not in expected]
        shapes = [f"{k} is {tuple(saved[k].shape)} in the file, {tuple(v.shape)} in the model"
                  for k, v in expected.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
        parts = [f"{len(missing)} weight(s) missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unknown (first: {unexpected[0]})" if unexpected else "",
                 "; ".join(shapes[:2]) + (f" and {len(shapes) - 2} more" if len(shapes) > 2 else "")]
        first = ", ".join(x for x in parts if x) or str(e)[:300]
        raise CheckpointError(f"{path}: its weights do not fit the model its config names ({cfg.model.name}, "
                              f"{info.num_classes} classes, {info.in_channels} channels): {first}") from None
    return model.to(map_location).eval(), cfg, info
