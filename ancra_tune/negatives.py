"""Negative examples (OEs) picked from the batch (paper Table I, the released ``pick_neg``), vectorised.

For every anchor i a partner j with y_j != y_i is chosen:

  random: as released, another class present in the batch uniformly, then one of its examples
          uniformly (``random_draw="class"``); or uniformly over all other-label examples
          (``random_draw="example"``, which differs whenever classes are unbalanced in the batch);
  soft  (Soft-LS): among candidates predicted as the anchor is, h(x_j) = h(x_i);
  hard  (Hard-LS): among candidates predicted as the anchor's label, h(x_j) = y_i;
  easy  (released, not in the paper): candidates predicted neither as y_i nor as h(x_i).

Among a criterion's candidates the released code takes the one with the largest logit of the
anchor's label (``pick="max_logit"``); ``pick="uniform"`` takes any of them. Where a criterion
has no candidate the row falls back to ``random``; the share of such rows is the fallback rate.
A row whose batch holds no other label at all is invalid (its ANC term is masked out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STRATEGIES = ("random", "soft", "hard", "easy")
RANDOM_DRAWS = ("class", "example")
PICKS = ("max_logit", "uniform")


@dataclass(frozen=True)
class NegativeSelection:
    index: Tensor  # (N,) long: the partner of each anchor, into the batch
    fallback: Tensor  # (N,) bool: the strategy's criterion had no candidate, random was used
    valid: Tensor  # (N,) bool: some example of another label exists

    @property
    def fallback_rate(self) -> Tensor:
        """Share of anchors that fell back to random, as a 0-dim tensor."""
        return self.fallback.float().mean()


def _sample(weights: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One column per row of a (N, N) non-negative weight matrix, with probability proportional
    to the weights (Gumbel-max: argmax of log w + Gumbel noise); (index, row has any weight)."""
    dev = generator.device if generator is not None else weights.device
    u = torch.rand(weights.shape, generator=generator, device=dev).to(weights.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    scores = torch.where(weights > 0, weights.clamp_min(1e-30).log() + gumbel, torch.full_like(u, float("-inf")))
    return scores.argmax(dim=1), (weights > 0).any(dim=1)


def _random_weights(labels: Tensor, other: Tensor, draw: str) -> Tensor:
    """Weights of the random draw: 1 / (size of j's class in the batch) for ``class`` (each other
    class present equally likely, then each of its examples), 1 for ``example``."""
    if draw == "example":
        return other.float()
    same = labels[:, None] == labels[None, :]  # (N, N)
    class_size = same.sum(dim=0).float()  # (N,): examples of y_j in the batch
    return other.float() / class_size[None, :]


def select_negatives(labels: Tensor, *, strategy: str, preds: Tensor | None = None,
                     logits: Tensor | None = None, random_draw: str = "class", pick: str = "max_logit",
                     generator: torch.Generator | None = None) -> NegativeSelection:
    """labels: (N,) true labels. soft/hard/easy need ``preds`` (N,) predicted classes, and with
    ``pick="max_logit"`` the batch's ``logits`` (N, K) (preds default to their argmax)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown negative strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if random_draw not in RANDOM_DRAWS:
        raise ValueError(f"unknown random draw {random_draw!r}; known: {', '.join(RANDOM_DRAWS)}")
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; known: {', '.join(PICKS)}")
    other = labels[:, None] != labels[None, :]  # (N, N): j has another label than i
    rand_idx, valid = _sample(_random_weights(labels, other, random_draw), generator)
    if strategy == "random":
        return NegativeSelection(index=rand_idx, fallback=torch.zeros_like(valid), valid=valid)
    if preds is None and logits is not None:
        preds = logits.argmax(dim=1)
    if preds is None:
        raise ValueError(f"strategy {strategy!r} needs the batch's predicted classes (preds or logits)")
    if strategy == "soft":
        crit = preds[None, :] == preds[:, None]  # h(x_j) = h(x_i)
    elif strategy == "hard":
        crit = preds[None, :] == labels[:, None]  # h(x_j) = y_i
    else:  # easy
        crit = (preds[None, :] != labels[:, None]) & (preds[None, :] != preds[:, None])
    cand = other & crit
    has = cand.any(dim=1)
    if pick == "max_logit":
        if logits is None:
            raise ValueError("pick='max_logit' needs the batch's logits")
        score = logits[:, labels].t().float()  # (N, N): [i, j] = logit of y_i for example j
        crit_idx = score.masked_fill(~cand, float("-inf")).argmax(dim=1)
    else:
        crit_idx, _ = _sample(cand.float(), generator)
    index = torch.where(has, crit_idx, rand_idx)
    return NegativeSelection(index=index, fallback=~has & valid, valid=valid)
