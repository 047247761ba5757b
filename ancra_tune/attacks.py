"""L-inf attacks as functions of tensors.

Threat model: ``S(x) = {x' : ||x' - x||_inf <= eps, 0 <= x' <= 1}``. An attack step is
``x' <- Proj_S(x' + s * step_size * sign(grad))`` with ``s = +1`` to raise the objective
(untargeted) and ``s = -1`` to lower CE toward a target class (targeted, eq. 5).
Nothing is kept between calls; the BatchNorm mode and the RA gate are explicit arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import ModelOutput

BNMode = Literal["eval", "train"]
Init = Literal["gaussian", "uniform", "none"]


def final_logits(out: ModelOutput) -> Tensor:
    """The head most attacks target: the final prediction P'."""
    return out.logits


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """C&W margin per example: ``max_{j != y} z_j - z_y`` (> 0 means misclassified). (N,)"""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(1).values - z_y


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
         head: Callable[[ModelOutput], Tensor] = final_logits, gate_labels: Tensor | None = None) -> Tensor:
    """FGSM (Goodfellow et al.): one signed-gradient step of size eps on CE, from x, eval mode."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, bn="eval", init="none", head=head,
               gate_labels=gate_labels)


def project(x_adv: Tensor, x_nat: Tensor, eps: float) -> Tensor:
    """Closest point of ``S(x_nat)`` in L-inf: clip to the eps-ball, then to [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x_nat - eps), x_nat + eps), 0.0, 1.0)


def random_start(x: Tensor, *, eps: float, init: Init | Tensor, init_std: float = 0.001,
                 generator: torch.Generator | None = None) -> Tensor:
    """``uniform``: x + U(-eps, eps) (Madry et al.), projected onto S(x); ``gaussian``: x + init_std *
    N(0, 1), not projected, exactly as the released ANCRA/TRADES code starts (the first step's
    projection brings it into S(x)); ``none``: x; a tensor: that starting point (projected onto S(x):
    an evaluation's cascade passes each example the start it would have had in the whole batch, or
    the last iterate of the attack it continues)."""
    if isinstance(init, Tensor):
        return project(init.to(x.device, x.dtype), x, eps)
    if init == "none":
        return x.clone()
    dev = generator.device if generator is not None else x.device
    if init == "uniform":
        noise = (torch.rand(x.shape, generator=generator, device=dev) * 2 - 1) * eps
        return project(x + noise.to(x.device, x.dtype), x, eps)
    if init == "gaussian":
        return x + (torch.randn(x.shape, generator=generator, device=dev) * init_std).to(x.device, x.dtype)
    raise ValueError(f"unknown init {init!r}; allowed: gaussian, uniform, none")


@contextmanager
def bn_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Run ``model`` with BatchNorm in ``mode`` ("eval": running statistics; "train": batch
    statistics, which also updates the running averages), restoring the previous mode."""
    if mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    try:
        yield model
    finally:
        model.train(was_training)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    bn: BNMode,
    targeted: bool | Tensor = False,
    objective: Literal["ce", "kl", "cw"] = "ce",
    ref_probs: Tensor | None = None,
    gate_labels: Tensor | None = None,
    head: Callable[[ModelOutput], Tensor] = final_logits,
    loss_fn: Callable[[ModelOutput, Tensor], Tensor] | None = None,
    init: Init | Tensor = "uniform",
    init_std: float = 0.001,
    momentum: float = 0.0,
    eot: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent in the L-inf ball, batched over examples.

    x: (N, C, H, W) in [0, 1]; y: (N,) the true label (untargeted rows) or the target class
    (targeted rows). ``targeted`` is a bool for the whole batch or a (N,) bool mask, so
    untargeted AEs and targeted OEs can be crafted together in one forward/backward per step.
    ``objective``: untargeted rows raise CE(head(x'), y), or with "kl" the TRADES
    KL(ref_probs || softmax(head(x'))), or with "cw" the C&W margin max_{j != y} z_j - z_y;
    targeted rows lower CE toward y. ``loss_fn(output, y) -> (N,)`` replaces the per-row
    objective of every row (several heads at once: the released training attack, adaptive
    attacks); targeted rows then descend it. ``momentum`` > 0 is MIM (Dong et al.): steps follow
    the sign of g <- mu g + grad / ||grad||_1. ``eot`` > 1 averages the gradient over that many
    forward/backward passes (expectation over transformation, for randomised models).
    ``gate_labels``: the RA gate class per row; None gates by the model's own prediction.
    Returns x' in S(x), detached.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eot < 1:
        raise ValueError(f"eot must be >= 1, got {eot}")
    if objective not in ("ce", "kl", "cw"):
        raise ValueError(f"unknown objective {objective!r}; allowed: ce, kl, cw")
    if objective == "kl" and ref_probs is None and loss_fn is None:
        raise ValueError("objective='kl' needs ref_probs, the softmax of the natural logits")
    mask = torch.as_tensor(targeted, device=x.device).expand(x.shape[0]).bool()
    # +1 raises the objective (untargeted), -1 lowers it toward the target (targeted).
    sign = torch.where(mask, -1.0, 1.0).to(x.dtype)
    x = x.detach()
    x_adv = random_start(x, eps=eps, init=init, init_std=init_std, generator=generator)
    lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)  # S(x) as a box: one clamp per step
    velocity = torch.zeros_like(x) if momentum else None

    def rows_loss(out: ModelOutput) -> Tensor:
        if loss_fn is not None:
            return loss_fn(out, y)
        logits = head(out)  # (N, K)
        per_ex = F.cross_entropy(logits, y, reduction="none")  # (N,)
        if objective == "kl":
            kl = (ref_probs * (torch.log(ref_probs + 1e-12) - F.log_softmax(logits, 1))).sum(1)
            per_ex = torch.where(mask, per_ex, kl)
        elif objective == "cw":
            per_ex = torch.where(mask, per_ex, cw_margin(logits, y))
        return per_ex

    with bn_mode(model, bn):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad = torch.zeros_like(x)
            for _ in range(eot):
                # Ascend sum_i sign_i * loss_i: in eval mode rows are independent, so each row gets
                # its own gradient (only its sign is used). Only d/dx is computed, not weight grads.
                (g,) = torch.autograd.grad((sign * rows_loss(model(x_adv, gate_labels))).sum(), x_adv)
                grad = grad + g
            if momentum:
                l1 = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                velocity = momentum * velocity + grad / l1
                grad = velocity
            x_adv = torch.clamp(x_adv.detach() + step_size * grad.sign(), lo, hi)
    if steps == 0:
        x_adv = torch.clamp(x_adv, lo, hi)
    return x_adv.detach()
