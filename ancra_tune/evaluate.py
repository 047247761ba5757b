"""Accuracy under no attack and under PGD, naming the head each attack targeted.

These are the per-epoch validation metrics of the trainer. The full evaluation suite
(AutoAttack, adaptive attacks on RA, gradient-masking checks) builds on them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attacks import final_logits, pgd
from .data import ArrayData, BatchLoader
from .models import ModelOutput


def last_aux_logits(out: ModelOutput) -> Tensor:
    """The auxiliary prediction P of the last RA block (the one the final gate uses)."""
    if not out.aux_logits:
        raise ValueError("the model has no auxiliary outputs (RA is off)")
    return out.aux_logits[-1]


HEADS: dict[str, Callable[[ModelOutput], Tensor]] = {"final": final_logits, "aux": last_aux_logits}


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: ArrayData, *, batch_size: int, device: torch.device) -> float:
    """Share of ``data`` the final prediction P' gets right, in eval mode (RA gated by P)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size=batch_size, shuffle=False, device=device):
        correct += (model(x).logits.argmax(1) == y).sum()
    return correct.item() / max(1, len(data))


def pgd_accuracy(model: nn.Module, data: ArrayData, *, head: str, eps: float, step_size: float,
                 steps: int, batch_size: int, device: torch.device, seed: int = 0) -> float:
    """Accuracy of P' on PGD AEs that maximise CE on ``head`` ("final" P' or "aux" P)."""
    attack_head = HEADS[head]
    gen = torch.Generator().manual_seed(seed)  # the same start every epoch: comparable numbers
    correct = torch.zeros((), dtype=torch.long, device=device)
    model.eval()
    for x, y in BatchLoader(data, batch_size=batch_size, shuffle=False, device=device):
        x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, bn="eval", head=attack_head,
                    init="uniform", generator=gen)
        with torch.no_grad():
            correct += (model(x_adv).logits.argmax(1) == y).sum()
    return correct.item() / max(1, len(data))
