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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an ancra-tune checkpoint (format {FORMAT_VERSION})")
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
    model.load_state_dict(state["model"], strict=True)
    return model.to(map_location).eval(), cfg, info
