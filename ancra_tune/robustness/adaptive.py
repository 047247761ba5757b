"""Adaptive attacks on reverse attention: differentiable surrogates of the RA gate, attacked with
fixed-step PGD and with AutoAttack's APGD-CE and APGD-T (DLR) from ``pyautoattack`` (the code of
fra31/auto-attack), its step-size schedule and restarts.

A surrogate only guides the attack. What counts is the real model: a :class:`Tracker` watches
every point the attack visits, scores it on the real prediction P', and keeps the first point
that fools it for each example. So an adaptive attack is never weaker than its best iterate.
The real P' of a visited point comes from the surrogate's own forward pass (``real=True``): the
network runs once per step, and only the blocks after the first gate that differs from the argmax
gate run again for it (none for the straight-through gate and the plain targets).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import ModelOutput, RANet


class Tracker:
    """Per example: has the real model been fooled at some visited point, and at which one."""

    def __init__(self, model: RANet, x: Tensor, y: Tensor) -> None:
        self.model, self.y = model, y
        self.best = x.detach().clone()
        self.fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    @torch.no_grad()
    def observe(self, x_rows: Tensor, rows: Tensor) -> None:
        """``x_rows`` (n, ...) are candidate AEs of the examples ``rows`` (n,)."""
        self.record(x_rows, self.model(x_rows.detach()).logits, rows)

    @torch.no_grad()
    def record(self, x_rows: Tensor, real_logits: Tensor, rows: Tensor) -> None:
        """As :meth:`observe`, given the real model's P' on ``x_rows`` (from a shared pass)."""
        pred = real_logits.argmax(1)
        hit = (pred != self.y[rows]) & ~self.fooled[rows]
        if hit.any():
            self.best[rows[hit]] = x_rows[hit].detach()
            self.fooled[rows[hit]] = True

    def result(self, fallback: Tensor) -> Tensor:
        """The fooling points where found, ``fallback`` (the attack's own output) elsewhere."""
        return torch.where(self.fooled.view(-1, *([1] * (fallback.dim() - 1))), self.best, fallback)


def sum_logits(out: ModelOutput) -> Tensor:
    """Logits of the product of P' and every auxiliary P: sum_h log softmax(P_h). (N, K)"""
    total = F.log_softmax(out.logits, 1)
    for aux in out.aux_logits:
        total = total + F.log_softmax(aux, 1)
    return total


def sum_ce(out: ModelOutput, y: Tensor) -> Tensor:
    """The paper's adaptive total loss per example: CE(P') + sum_b CE(P_b). (N,)"""
    loss = F.cross_entropy(out.logits, y, reduction="none")
    for aux in out.aux_logits:
        loss = loss + F.cross_entropy(aux, y, reduction="none")
    return loss


def surrogate_output(model: RANet, x: Tensor, target: str, labels: Tensor, temperature: float, *,
                     real: bool = False) -> ModelOutput:
    """The forward pass an attack on ``target`` differentiates (see ``suite.TARGETS``); ``real``:
    with the real model's P' from the same pass (``ModelOutput.real_logits``)."""
    if target == "labelgate":
        return model(x, labels, real=real)
    if target == "stgate":
        return model(x, soft_gate=temperature, gate="straight_through", real=real)
    if target == "softgate":
        return model(x, soft_gate=temperature, gate="soft", real=real)
    if target in ("final", "aux", "sum"):
        return model(x, real=real)
    raise ValueError(f"unknown attack target {target!r}")


def surrogate_logits(out: ModelOutput, target: str) -> Tensor:
    """The logits a logits-only attack (APGD) sees for ``target``."""
    if target == "aux":
        return out.aux_logits[-1]
    if target == "sum":
        return sum_logits(out)
    return out.logits


class SurrogateModel(nn.Module):
    """For fixed-step PGD: the surrogate's forward (a ``ModelOutput``), every call observed by the
    tracker (the whole batch, rows 0..N-1)."""

    def __init__(self, model: RANet, target: str, labels: Tensor, tracker: Tracker, temperature: float) -> None:
        super().__init__()
        self.model, self.target, self.labels = model, target, labels
        self.tracker, self.temperature = tracker, temperature
        self.rows = torch.arange(labels.shape[0], device=labels.device)
        self.train(model.training)

    def forward(self, x: Tensor, gate_labels: Tensor | None = None) -> ModelOutput:
        out = surrogate_output(self.model, x, self.target, self.labels, self.temperature, real=True)
        self.tracker.record(x, out.real_logits, self.rows)
        return out


class SurrogateLogits(nn.Module):
    """For APGD: logits only, on the examples ``rows`` of the batch (set before each run, because
    APGD works on the still-robust subset); every call is observed by the tracker."""

    def __init__(self, model: RANet, target: str, tracker: Tracker, temperature: float) -> None:
        super().__init__()
        self.model, self.target, self.tracker, self.temperature = model, target, tracker, temperature
        self.rows: Tensor | None = None
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        assert self.rows is not None and x.shape[0] == self.rows.shape[0]
        labels = self.tracker.y[self.rows]
        out = surrogate_output(self.model, x, self.target, labels, self.temperature, real=True)
        self.tracker.record(x, out.real_logits, self.rows)
        return surrogate_logits(out, self.target)


def pgd_loss(target: str) -> Callable[[ModelOutput, Tensor], Tensor] | None:
    """The per-example objective of fixed-step PGD on ``target`` (None: CE of P')."""
    if target == "aux":
        return lambda out, y: F.cross_entropy(out.aux_logits[-1], y, reduction="none")
    if target == "sum":
        return sum_ce
    return None


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """APGD draws its random starts from the global generator: fork it so the evaluation is
    deterministic per (seed, batch, attack) and leaves the caller's random state alone."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def apgd(model: RANet, x: Tensor, y: Tensor, *, target: str, loss: str, eps: float, n_iter: int,
         n_restarts: int, n_targets: int, temperature: float, seed: int, eot_iter: int = 1,
         flags: list[str] | None = None, positions: Tensor | None = None, batch_size: int | None = None) -> Tensor:
    """APGD-CE (``loss="ce"``) or APGD-T (``loss="dlr-targeted"``) on the surrogate of ``target``,
    with AutoAttack's restarts and target classes over the examples the real model still gets
    right; returns the batch's AEs (the real model's fooling points where found).

    Each example's random start is drawn for its place (``positions``, default 0..n-1) in a batch of
    ``batch_size``: an example attacked with fewer others (the evaluation's cascade) starts where it
    would have in the whole batch, and APGD (per-example steps and step sizes) gives it the same AE."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    tracker = Tracker(model, x, y)
    with torch.no_grad():
        correct = model(x).logits.argmax(1) == y
    tracker.fooled |= ~correct  # already wrong: nothing to attack
    wrapper = SurrogateLogits(model, target, tracker, temperature)
    common = dict(n_iter=n_iter, norm="Linf", n_restarts=1, eps=eps, seed=seed, eot_iter=eot_iter, verbose=False,
                  device=x.device)
    if loss == "ce":
        attack = APGDAttack(wrapper, loss="ce", **common)
        rounds = [None] * n_restarts
    elif loss == "dlr-targeted":
        attack = APGDAttack_targeted(wrapper, n_target_classes=n_targets, **common)
        rounds = [t for t in range(2, n_targets + 2) for _ in range(n_restarts)]
    else:
        raise ValueError(f"unknown APGD loss {loss!r}")
    attack.init_hyperparam(x)
    last = x.clone()
    place = positions.to(x.device) if positions is not None else torch.arange(x.shape[0], device=x.device)
    full = batch_size if batch_size is not None else x.shape[0]
    with _seeded(seed, x.device), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r, target_class in enumerate(rounds):
            rows = (~tracker.fooled).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            wrapper.rows = rows
            if target_class is not None:  # APGD-T: the target is the surrogate's k-th most likely class
                with torch.no_grad():
                    attack.y_target = wrapper(x[rows]).sort(dim=1)[1][:, -target_class]
            gen = torch.Generator().manual_seed((seed * 1_000_003 + r) % 2**63)
            t = (2 * torch.rand((full, *x.shape[1:]), generator=gen) - 1).to(x.device, x.dtype)[place[rows]]
            x_init = (x[rows] + eps * attack.normalize(t)).clamp(0.0, 1.0)  # AutoAttack's Linf start, per place
            # x_best and x_best_adv are points APGD visited through the wrapper: already observed
            x_best, _, _, _ = attack.attack_single_run(x[rows], y[rows], x_init=x_init)
            last[rows] = x_best.detach()
    if flags is not None:
        flags += [str(w.message) for w in caught if "pyautoattack" in (w.filename or "")]
    return tracker.result(last).clamp(0.0, 1.0)
