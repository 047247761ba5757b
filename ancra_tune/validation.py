"""Accuracy under no attack and under PGD, naming the head each attack targeted.

These are the per-epoch validation metrics of the trainer. The full evaluation suite
(AutoAttack, adaptive attacks on RA, gradient-masking checks) builds on them.
"""

from __future__ import annotations

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


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: ArrayData, *, batch_size: int, device: torch.device) -> float:
    """Share of ``data`` the final prediction P' gets right, in eval mode (RA gated by P)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size=batch_size, shuffle=False, device=device):
        correct += (model(x).logits.argmax(1) == y).sum()
    return correct.item() / max(1, len(data))


GATE_TARGETS = {"stgate": "straight_through", "softgate": "soft"}


class SurrogateGate(nn.Module):
    """The model with a differentiable surrogate of the RA gate, rows ``softmax(P / T) @ W``:
    ``gate="straight_through"`` keeps the argmax gate's forward values and backpropagates through
    the surrogate (BPDA); ``gate="soft"`` uses the surrogate in the forward pass too (a smooth
    model whose gradient shows where the gate would move). See ``RANet.forward``."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, gate: str = "straight_through") -> None:
        super().__init__()
        self.model, self.temperature, self.gate = model, temperature, gate
        self.train(model.training)  # a wrapper must not flip the model's BatchNorm mode

    def forward(self, x: Tensor, labels: Tensor | None = None) -> ModelOutput:
        return self.model(x, labels, soft_gate=self.temperature, gate=self.gate)


def pgd_correct(model: nn.Module, data: ArrayData, *, target: str, eps: float, step_size: float,
                steps: int, batch_size: int, device: torch.device, seed: int = 0) -> Tensor:
    """(N,) bool: P' right on PGD AEs that maximise CE on ``target``: "final" (P'), "aux" (the
    last block's P), "stgate" or "softgate" (P' through the straight-through or soft surrogate of
    the gate). Correctness is always that of the real model."""
    if target not in ("final", "aux", *GATE_TARGETS):
        raise ValueError(f"unknown PGD target {target!r}; known: final, aux, {', '.join(GATE_TARGETS)}")
    attacked = SurrogateGate(model, gate=GATE_TARGETS[target]) if target in GATE_TARGETS else model
    head = last_aux_logits if target == "aux" else final_logits
    gen = torch.Generator().manual_seed(seed)  # the same start every epoch: comparable numbers
    model.eval()
    out = []
    for x, y in BatchLoader(data, batch_size=batch_size, shuffle=False, device=device):
        x_adv = pgd(attacked, x, y, eps=eps, step_size=step_size, steps=steps, bn="eval", head=head,
                    init="uniform", generator=gen)
        with torch.no_grad():
            out.append(model(x_adv).logits.argmax(1) == y)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=device)
