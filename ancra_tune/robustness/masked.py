"""Deliberately masked models: what the gradient-masking checks must catch.

Each wraps a trained model and breaks its gradients in one of the ways the evaluation literature
describes (Athalye et al. 2018), without making it more robust in truth:

  quantize         shattered gradients: inputs rounded to a few levels (zero input gradient)
  scale            vanishing gradients: logits multiplied by a large constant (saturated softmax)
  noise            stochastic gradients: Gaussian noise added to every input (a random model)
  random_gradient  a backward pass that returns noise while the forward pass is unchanged

The tests and ``benchmarks/masked_models.py`` evaluate them and check the verdicts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models import ModelOutput, RANet

KINDS = ("quantize", "scale", "noise", "random_gradient")


class _NoiseGradient(torch.autograd.Function):
    """Identity forward; the backward pass returns Gaussian noise of the incoming gradient's scale."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        noise = torch.randn_like(grad)
        return noise * grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1))) / grad[0].numel() ** 0.5


class MaskedModel(nn.Module):
    """``model`` with its gradients broken by ``kind`` (see the module doc); predictions of
    ``quantize`` and ``noise`` change, those of ``scale`` and ``random_gradient`` do not."""

    def __init__(self, model: RANet, kind: str, *, levels: int = 3, scale: float = 1e4, sigma: float = 0.1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown masking {kind!r}; known: {', '.join(KINDS)}")
        self.model, self.kind = model, kind
        self.levels, self.scale, self.sigma = levels, scale, sigma
        self.train(model.training)

    @property
    def ra(self) -> bool:
        return self.model.ra

    @property
    def fc(self) -> nn.Linear:
        return self.model.fc

    def forward(self, x: Tensor, labels: Tensor | None = None, **kw: Any) -> ModelOutput:
        if self.kind == "quantize":
            x = torch.round(x * self.levels) / self.levels
        elif self.kind == "noise":
            x = (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)
        elif self.kind == "random_gradient":
            x = _NoiseGradient.apply(x)
        out = self.model(x, labels, **kw)
        if self.kind == "scale":
            real = out.real_logits * self.scale if out.real_logits is not None else None
            return ModelOutput(logits=out.logits * self.scale, aux_logits=tuple(a * self.scale for a in out.aux_logits),
                               features=out.features, real_logits=real)
        return out


def reference_accuracy(model: nn.Module, base: nn.Module, x: Tensor, y: Tensor, *, eps: float,
                       square_queries: int = 5000, seed: int = 123) -> float:
    """What an independent strong attack leaves of ``model`` (a masked wrapper of ``base``): examples
    that survive both PGD-40 crafted on the unmasked ``base`` and transferred, and a Square run of
    ``square_queries`` queries with its own seed. The evaluation's worst case must not exceed it."""
    from pyautoattack.square import SquareAttack

    from ..attacks import pgd
    from .runner import LogitsOnly

    torch.manual_seed(seed)
    transfer = pgd(base, x, y, eps=eps, step_size=eps / 4, steps=40, bn="eval",
                   generator=torch.Generator().manual_seed(seed))
    sq = SquareAttack(LogitsOnly(model), p_init=0.8, n_queries=square_queries, eps=eps, norm="Linf", n_restarts=1,
                      seed=seed, verbose=False, device=x.device, resc_schedule=False)
    with torch.no_grad():
        square = sq.perturb(x, y)
        ok = (model(transfer).logits.argmax(1) == y) & (model(square).logits.argmax(1) == y)
    return ok.float().mean().item()
