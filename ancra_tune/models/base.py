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
    real_logits: asked for with ``real=True``: the real model's P' (argmax gate, no labels) for the
        same inputs, detached; it shares every computation it has in common with ``logits``.
    """

    logits: Tensor
    aux_logits: tuple[Tensor, ...]
    features: Tensor
    real_logits: Tensor | None = None


def reverse_attention(features: Tensor, weight: Tensor, classes: Tensor) -> Tensor:
    """Eq. 6: ``z'_i = z_i * w[c, i]`` for every feature i of the classifier's input.

    features: (N, D) pooled features, or a (N, C, H, W) map whose pooled readout has D = C * g * g
    features (g x g average-pooling grid, g = 1 for global pooling): each row weight then scales
    its channel's cell of the map. weight: the classifier matrix (K, D); classes: (N,) gate class.
    """
    d = features.shape[1] if features.dim() == 2 else None
    if features.dim() == 4:
        c, h, w = features.shape[1:]
        g = round((weight.shape[1] / c) ** 0.5) if weight.shape[1] % c == 0 else 0
        d = c * g * g if g else None
        if d is not None and (h % g or w % g):
            raise ValueError(f"reverse_attention: a {h}x{w} map cannot be cut into a {g}x{g} grid")
    if weight.dim() != 2 or d is None or d != weight.shape[1]:
        raise ValueError(
            f"reverse_attention: features of shape {tuple(features.shape)} do not match the classifier "
            f"weight of shape {tuple(weight.shape)}; need weight of shape (K, C * g * g)"
        )
    return _scale_channels(features, weight[classes])


def _scale_channels(features: Tensor, rows: Tensor) -> Tensor:
    """features (N, D) or (N, C, H, W) times one row (N, D) per example.

    For a map, D = C * g * g: row entry c * g * g + i * g + j scales cell (i, j) of channel c,
    the cell that average-pools to that feature (the released PreActResNet's per-quadrant mask
    for g = 2; a plain channel-wise scale for g = 1)."""
    if features.dim() == 4:
        n, c, h, w = features.shape
        g = round((rows.shape[1] // c) ** 0.5)
        grid = rows.view(n, c, g, g)
        if g > 1:
            grid = grid.repeat_interleave(h // g, dim=2).repeat_interleave(w // g, dim=3)
        return features * grid  # (N, C, 1, 1) broadcasts over H, W when g = 1
    if features.dim() != 2:
        raise ValueError(f"reverse_attention: features must be (N, D) or (N, C, H, W), got {features.shape}")
    return features * rows


GATES = ("hard", "straight_through", "soft")


class Normalize(nn.Module):
    """Inputs arrive in [0, 1]; normalisation lives in the model so attacks work in pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class RANet(nn.Module):
    """Shared forward with switchable RA. Subclasses set ``stem``, ``last_stage``, ``post``, ``fc``.

    Two class attributes describe where the released architectures differ:

    - ``pool_grid``: the readout average-pools the last map to a g x g grid and flattens it, so
      the classifier sees C * g * g features (1: global pooling; 2: the released PreActResNet-18's
      2048-d feature of a 512-channel map);
    - ``post_in_ra_blocks``: with RA on, ``post`` (the final BN-ReLU of a pre-activation net) runs
      inside every RA block and its output is what is weighted and fed forward, as in the released
      WRN and PreActResNet; without RA, ``post`` runs once before the readout.
    """

    stem: nn.Module
    last_stage: nn.ModuleList
    post: nn.Module  # applied to a last-stage feature map before pooling (BN-ReLU or identity)
    fc: nn.Linear
    pool_grid: int = 1
    post_in_ra_blocks: bool = False

    def __init__(self, *, mean: tuple[float, ...], std: tuple[float, ...], ra: bool,
                 ra_feed_weighted: bool = True) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.ra = ra
        self.ra_feed_weighted = ra_feed_weighted

    def pool(self, z: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C * g * g): average over each cell of the g x g grid, flattened."""
        return torch.flatten(F.adaptive_avg_pool2d(z, self.pool_grid), 1)

    def readout(self, z: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, D): what the classifier sees, from a last-stage block's output."""
        return self.pool(self.post(z))

    def forward(self, x: Tensor, labels: Tensor | None = None, *, soft_gate: float | None = None,
                gate: str = "hard", real: bool = False) -> ModelOutput:
        """x in [0, 1], (N, C_in, H, W). ``labels`` gate RA (training); None gates by argmax P.

        Evaluation only, for adaptive attacks on the argmax gate (without RA nothing changes):
        ``soft_gate`` is a temperature T for the surrogate rows ``softmax(P / T) @ W``;
        ``gate="straight_through"`` keeps the hard gate's forward values and backpropagates through
        the surrogate (BPDA); ``gate="soft"`` uses the surrogate rows in the forward pass too.
        ``real``: also give the real model's P' (``real_logits``) from the same pass: the stem and
        every block before the first gate whose rows differ from the argmax gate's run once (with
        the argmax or straight-through gate, nothing runs twice; with labels or the soft gate, only
        the blocks after the first gate run again, without autograd).
        """
        z = self.stem(self.normalize(x))
        if not self.ra:
            for block in self.last_stage:
                z = block(z)
            feat = self.readout(z)
            logits = self.fc(feat)
            return ModelOutput(logits=logits, aux_logits=(), features=feat,
                               real_logits=logits.detach() if real else None)
        if gate not in GATES:
            raise ValueError(f"gate = {gate!r} is invalid: must be one of {', '.join(GATES)}")
        if soft_gate is not None and gate == "hard":
            gate = "straight_through"

        weight = self.fc.weight  # (K, D): the rows RA weights by
        aux: list[Tensor] = []
        real_logits: Tensor | None = None
        last = len(self.last_stage) - 1
        feat = z  # rebound below; the loop always runs at least once
        for i in range(len(self.last_stage)):
            z, feat = self._ra_block(i, z)
            p = self.fc(feat)  # auxiliary prediction P of this block
            aux.append(p)
            # Gate class: the label when given, else this block's own prediction. The argmax
            # has no gradient: an attack on P' alone learns nothing about the gate (masking).
            # the argmax gate's rows (N, D); a labelled training step needs them only for ``real``
            hard = weight[p.argmax(dim=1)] if labels is None or real else None
            rows = weight[labels] if labels is not None else hard
            if labels is None and gate != "hard":
                soft = F.softmax(p / (soft_gate or 1.0), dim=1) @ weight  # (N, D), differentiable in p
                # straight-through: forward the hard rows (exactly: soft - soft is 0), backward the
                # soft ones; soft: both soft.
                rows = rows + (soft - soft.detach()) if gate == "straight_through" else soft
            if real and real_logits is None and (labels is not None or gate == "soft"):
                with torch.no_grad():  # the real gate parts from this one here: finish its path alone
                    real_logits = self._hard_path(i, z.detach(), feat.detach(), hard.detach())
            if i < last:
                if self.ra_feed_weighted:
                    z = _scale_channels(z, rows)
            else:
                feat = feat * rows
        logits = self.fc(feat)
        if real and real_logits is None:  # the argmax or straight-through gate: the same values
            real_logits = logits.detach()
        return ModelOutput(logits=logits, aux_logits=tuple(aux), features=feat, real_logits=real_logits)

    def _ra_block(self, i: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """Block ``i`` of the last stage with RA: its output (fed forward) and its unweighted feature."""
        z = self.last_stage[i](z)
        if self.post_in_ra_blocks:
            z = self.post(z)  # released WRN/PreActResNet: BN-ReLU inside the block, fed forward
            return z, self.pool(z)
        return z, self.readout(z)  # unweighted, (N, D)

    def _hard_path(self, i: int, z: Tensor, feat: Tensor, rows: Tensor) -> Tensor:
        """P' of the argmax gate from block ``i``'s output ``z``, feature and argmax rows on."""
        last = len(self.last_stage) - 1
        while i < last:
            if self.ra_feed_weighted:
                z = _scale_channels(z, rows)
            i += 1
            z, feat = self._ra_block(i, z)
            rows = self.fc.weight[self.fc(feat).argmax(dim=1)]
        return self.fc(feat * rows)
