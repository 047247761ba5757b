"""Models with switchable reverse attention, chosen by name from a plain registry."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .base import ModelOutput, Normalize, RANet, reverse_attention
from .resnet import PreActResNet18, ResNet18
from .small_cnn import SmallCNN
from .wrn import WideResNet

MODEL_REGISTRY: dict[str, Callable[..., RANet]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "preact_resnet18": PreActResNet18,
    "wrn28_10": partial(WideResNet, depth=28, widen=10),
    "wrn34_10": partial(WideResNet, depth=34, widen=10),
}


def create_model(name: str, *, num_classes: int, in_channels: int = 3,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
                 ra: bool = True, ra_feed_weighted: bool = True) -> RANet:
    """Build a model by name; inputs in [0, 1], normalised inside with ``mean``/``std``."""
    try:
        ctor = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_REGISTRY)}") from None
    if len(mean) == 1 and in_channels > 1:
        mean, std = mean * in_channels, std * in_channels
    return ctor(num_classes=num_classes, in_channels=in_channels, mean=tuple(mean), std=tuple(std),
                ra=ra, ra_feed_weighted=ra_feed_weighted)


def unwrap(model: nn.Module) -> RANet:
    """The RANet inside a DDP/compiled wrapper."""
    while not isinstance(model, RANet) and hasattr(model, "module"):
        model = model.module  # type: ignore[assignment]
    if not isinstance(model, RANet):
        raise TypeError(f"expected an ancra_tune model, got {type(model).__name__}")
    return model


__all__ = [
    "MODEL_REGISTRY", "ModelOutput", "Normalize", "RANet", "create_model", "reverse_attention", "unwrap",
]
