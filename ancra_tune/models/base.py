"""Reverse attention (eq. 6) and the network skeleton every model shares.

A model is a *stem* (everything before the last stage), the *last stage* as a list of
blocks, a *readout* (pooling, plus the final BatchNorm-ReLU for pre-activation nets)
and a linear classifier ``fc``. With RA on, each block of the last stage is followed
by reverse attention: its auxiliary prediction P is ``fc`` on its pooled *unweighted*
output, and its output is multiplied channel-wise by the classifier row of the gate
class (y during training, argmax P otherwise). The final prediction P' is ``fc`` on
the weighted feature of the last block. RA adds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelOutput:
    """One forward pass.

    logits: final logits P', (N, K).
    aux_logits: auxiliary logits P of each RA block, in order, each (N, K); empty without RA.
    features: the classifier's input for ``logits`` (RA-weighted with RA on), (N, C).
    """

    logits: Tensor
    aux_logits: tuple[Tensor, ...]
    features: Tensor


def reverse_attention(features: Tensor, weight: Tensor, classes: Tensor) -> Tensor:
    """Eq. 6: ``z'_i = z_i * w[c, i]`` for every channel i.

    features: (N, C) or (N, C, H, W); weight: classifier matrix (K, C); classes: (N,) gate class.
    """
    if weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"reverse_attention: features have {features.shape[1]} channels, "
            f"weight has shape {tuple(weight.shape)}; need weight of shape (K, {features.shape[1]})"
        )
    return _scale_channels(features, weight[classes])


def _scale_channels(features: Tensor, rows: Tensor) -> Tensor:
    """features (N, C) or (N, C, H, W) times one row (N, C) per example, channel-wise."""
    if features.dim() == 4:
        rows = rows[:, :, None, None]  # broadcast over H, W
    elif features.dim() != 2:
        raise ValueError(f"reverse_attention: features must be (N, C) or (N, C, H, W), got {features.shape}")
    return features * rows


class Normalize(nn.Module):
    """Inputs arrive in [0, 1]; normalisation lives in the model so attacks work in pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class RANet(nn.Module):
    """Shared forward with switchable RA. Subclasses set ``stem``, ``last_stage``, ``post``, ``fc``."""

    stem: nn.Module
    last_stage: nn.ModuleList
    post: nn.Module  # applied to a last-stage feature map before pooling (BN-ReLU or identity)
    fc: nn.Linear

    def __init__(self, *, mean: tuple[float, ...], std: tuple[float, ...], ra: bool,
                 ra_feed_weighted: bool = True) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.ra = ra
        self.ra_feed_weighted = ra_feed_weighted

    def readout(self, z: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C): what the classifier sees."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.post(z), 1), 1)

    def forward(self, x: Tensor, labels: Tensor | None = None, *, soft_gate: float | None = None) -> ModelOutput:
        """x in [0, 1], (N, C_in, H, W). ``labels`` gate RA (training); None gates by argmax P.

        ``soft_gate`` (a temperature T; evaluation only) keeps the argmax gate's forward values
        but backpropagates through ``softmax(P / T) @ W`` instead (BPDA, straight-through), so
        an adaptive attack sees how the gate would move. Without RA it changes nothing.
        """
        z = self.stem(self.normalize(x))
        if not self.ra:
            for block in self.last_stage:
                z = block(z)
            feat = self.readout(z)
            return ModelOutput(logits=self.fc(feat), aux_logits=(), features=feat)

        weight = self.fc.weight  # (K, C): the rows RA weights by
        aux: list[Tensor] = []
        last = len(self.last_stage) - 1
        feat = z  # rebound below; the loop always runs at least once
        for i, block in enumerate(self.last_stage):
            z = block(z)
            feat = self.readout(z)  # unweighted, (N, C)
            p = self.fc(feat)  # auxiliary prediction P of this block
            aux.append(p)
            # Gate class: the label when given, else this block's own prediction. The argmax
            # has no gradient: an attack on P' alone learns nothing about the gate (masking).
            rows = weight[labels if labels is not None else p.argmax(dim=1)]  # (N, C)
            if labels is None and soft_gate is not None:
                soft = F.softmax(p / soft_gate, dim=1) @ weight  # (N, C), differentiable in p
                rows = rows + soft - soft.detach()  # forward: the hard rows; backward: the soft ones
            if i < last:
                if self.ra_feed_weighted:
                    z = _scale_channels(z, rows)
            else:
                feat = _scale_channels(feat, rows)
        return ModelOutput(logits=self.fc(feat), aux_logits=tuple(aux), features=feat)
