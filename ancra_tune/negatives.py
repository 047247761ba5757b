"""Negative examples (OEs) picked from the batch (paper Table I), vectorised.

For every anchor i, a partner j with y_j != y_i is chosen uniformly among the candidates
of the strategy:
  random: any other label;
  soft  (Soft-LS): also h(x_j) = h(x_i), the same predicted class;
  hard  (Hard-LS): also h(x_j) = y_i, predicted as the anchor's label.
Where a criterion has no candidate the row falls back to ``random``; the share of such
rows is the fallback rate. A row whose batch holds no other label at all is invalid
(its ANC term is masked out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STRATEGIES = ("random", "soft", "hard")


@dataclass(frozen=True)
class NegativeSelection:
    index: Tensor  # (N,) long: the partner of each anchor, into the batch
    fallback: Tensor  # (N,) bool: the strategy's criterion had no candidate, random was used
    valid: Tensor  # (N,) bool: some example of another label exists

    @property
    def fallback_rate(self) -> Tensor:
        """Share of anchors that fell back to random, as a 0-dim tensor."""
        return self.fallback.float().mean()


def _pick(candidates: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Uniform choice of one True column per row of a (N, N) bool mask; (index, row has any)."""
    dev = generator.device if generator is not None else candidates.device
    scores = torch.rand(candidates.shape, generator=generator, device=dev).to(candidates.device)
    scores = scores.masked_fill(~candidates, -1.0)  # real scores are in [0, 1)
    return scores.argmax(dim=1), candidates.any(dim=1)


def select_negatives(labels: Tensor, *, strategy: str, preds: Tensor | None = None,
                     generator: torch.Generator | None = None) -> NegativeSelection:
    """labels: (N,) true labels; preds: (N,) predicted classes (needed by soft and hard)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown negative strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    other = labels[:, None] != labels[None, :]  # (N, N): j has another label than i
    rand_idx, valid = _pick(other, generator)
    if strategy == "random":
        return NegativeSelection(index=rand_idx, fallback=torch.zeros_like(valid), valid=valid)
    if preds is None:
        raise ValueError(f"strategy {strategy!r} needs the batch's predicted classes (preds)")
    if strategy == "soft":
        crit = preds[None, :] == preds[:, None]  # h(x_j) = h(x_i)
    else:
        crit = preds[None, :] == labels[:, None]  # h(x_j) = y_i
    crit_idx, has = _pick(other & crit, generator)
    index = torch.where(has, crit_idx, rand_idx)
    return NegativeSelection(index=index, fallback=~has & valid, valid=valid)
