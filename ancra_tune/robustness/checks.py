"""Gradient-masking checks (Carlini et al. 2019; Athalye et al. 2018; AutoAttack's own flags).

Each check is a :class:`Check` with a verdict (pass / fail / n/a), the numbers behind it and a
*scope*: a failing ``all`` check means no robust number of the report can be trusted (the
gradients themselves are broken, the model is random, a black-box attack does better than every
gradient attack); a failing ``final`` check means the numbers of attacks on the final output P'
alone overestimate robustness (RA's argmax gate hides it), while the worst case over the
adaptive attacks stands. ``docs/masking_checks.md`` explains each one.

The per-batch probes (:func:`randomness_probe`, :func:`gradient_probe`,
:func:`zero_gradient_mask`) run before the attacks, on every batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import RANet
from .suite import SURROGATES, TRANSFER_KINDS, AttackKind, AttackSpec, SuiteConfig, Target

SCOPES = ("all", "final")


class CheckName(StrEnum):
    """Every check a report can carry (``docs/masking_checks.md`` has a section for each)."""

    ROBUST_LE_CLEAN = "robust_le_clean"
    MORE_STEPS_NOT_WEAKER = "more_steps_not_weaker"
    EPS_TO_CHANCE = "eps_to_chance"
    WHITEBOX_BEATS_SQUARE = "whitebox_beats_square"
    WHITEBOX_BEATS_TRANSFER = "whitebox_beats_transfer"
    NO_ZERO_GRADIENTS = "no_zero_gradients"
    GRADIENT_SANITY = "gradient_sanity"
    DETERMINISTIC = "deterministic"
    FINAL_OUTPUT_NOT_MASKED = "final_output_not_masked"
    AUTOATTACK_RANDOMNESS = "autoattack_randomness"
    AUTOATTACK_ZERO_GRADIENTS = "autoattack_zero_gradients"
    AUTOATTACK_SQUARE = "autoattack_square"
    AUTOATTACK_LOGITS = "autoattack_logits"
    AUTOATTACK_DYNAMIC = "autoattack_dynamic"


def tolerance_examples(tol: float, n: int) -> int:
    """The checks' slack in examples: ``tol`` (a fraction) of ``n``, rounded to the nearest example.
    Verdicts compare example counts, so a tie can never fail by float rounding (27 of 100 against
    25 of 100 with a slack of 2 examples passes)."""
    return int(math.floor(tol * n + 0.5))


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: could not be run (n/a)
    explanation: str
    numbers: Mapping[str, Any] = field(default_factory=dict)
    scope: str = "all"

    @property
    def doc(self) -> str:
        return f"docs/masking_checks.md#{self.name.replace('_', '-')}"

    @property
    def failed(self) -> bool:
        return self.passed is False

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "fail", None: "n/a"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "explanation": self.explanation,
                "numbers": dict(self.numbers), "scope": self.scope, "doc": self.doc}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Check:
        return cls(name=d["name"], passed=d["passed"], explanation=d["explanation"], numbers=d.get("numbers", {}),
                   scope=d.get("scope", "all"))


# --------------------------------------------------------------------------- per-batch probes


def zero_gradient_mask(model: RANet, x: Tensor, y: Tensor) -> Tensor:
    """(N,) True where d CE(P'(x), y) / dx is exactly zero (no signal for a gradient attack)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).logits, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.flatten(1).abs().sum(1) == 0


def randomness_probe(model: RANet, x: Tensor, y: Tensor) -> bool:
    """True if the model is randomised: the same input twice gives different logits, or the
    input gradient of the loss differs between two calls."""
    model.eval()
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
    if not torch.equal(a, b):
        return True
    grads = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr).logits, y, reduction="sum"), xr)
        grads.append(g)
    return not torch.equal(grads[0], grads[1])


@dataclass(frozen=True)
class GradientProbe:
    """Finite differences against the analytic input gradient on a few examples of a batch.

    The probed function is the C&W margin max_{j != y} z_j - z_y of P' (it does not saturate as
    cross-entropy does, so float32 differences stay measurable). cosine: per example, the cosine
    between the k directional derivatives g . d_j from autograd and from central differences
    (f(x + h d_j) - f(x - h d_j)) / 2h along random sign directions d_j; rises: whether a small
    step along sign(g) raised f. Only examples with a gradient and a measurable change count."""

    cosine: Tensor  # (m,)
    rises: Tensor  # (m,) bool
    informative: Tensor  # (m,) bool

    MIN_COSINE = 0.5
    MIN_RISES = 0.8

    def summary(self) -> tuple[int, float, float]:
        """(informative examples, median cosine, share of rises among them)."""
        info = self.informative
        n = int(info.sum())
        if n == 0:
            return 0, float("nan"), float("nan")
        return n, float(self.cosine[info].median()), float(self.rises[info].float().mean())

    @property
    def sane(self) -> bool:
        n, cos, rise = self.summary()
        return n > 0 and cos >= self.MIN_COSINE and rise >= self.MIN_RISES


def gradient_probe(model: RANet, x: Tensor, y: Tensor, *, examples: int, directions: int, seed: int,
                   h: float = 1e-3) -> GradientProbe | None:
    from ..attacks import cw_margin

    if examples == 0:
        return None
    model.eval()
    x, y = x[:examples], y[:examples]
    m = x.shape[0]
    xr = x.clone().requires_grad_(True)
    f = cw_margin(model(xr).logits, y)  # (m,)
    (g,) = torch.autograd.grad(f.sum(), xr)
    gen = torch.Generator().manual_seed(seed)
    d = (torch.randint(0, 2, (directions, *x.shape), generator=gen) * 2 - 1).to(x.device, x.dtype)  # (k, m, ...)
    with torch.no_grad():
        def margin(z: Tensor) -> Tensor:
            return cw_margin(model(z.flatten(0, 1)).logits, y.repeat(directions)).view(directions, m)

        fd = (margin(x.unsqueeze(0) + h * d) - margin(x.unsqueeze(0) - h * d)) / (2 * h)  # (k, m)
        an = (g.unsqueeze(0) * d).flatten(2).sum(2)  # (k, m)
        cos = F.cosine_similarity(fd.t().double(), an.t().double(), dim=1, eps=1e-30).float()
        rises = cw_margin(model(x + h * g.sign()).logits, y) > f.detach()
    has_grad = g.flatten(1).abs().sum(1) > 0
    informative = has_grad & (fd.abs().amax(0) > 1e-4)
    return GradientProbe(cosine=cos.cpu(), rises=rises.cpu(), informative=informative.cpu())


# --------------------------------------------------------------------------- checks


_AA_FLAGS = {  # AutoAttack's own flags (pyautoattack.checks): message fragment -> (check, scope)
    "randomized defense": (CheckName.AUTOATTACK_RANDOMNESS, "all"),
    "zero gradient": (CheckName.AUTOATTACK_ZERO_GRADIENTS, "all"),
    "Square Attack has decreased": (CheckName.AUTOATTACK_SQUARE, "final"),
    "probability distribution": (CheckName.AUTOATTACK_LOGITS, "all"),
    "dynamic defense": (CheckName.AUTOATTACK_DYNAMIC, "all"),
}


def _final_only(s: AttackSpec) -> bool:
    return s.target is Target.FINAL


def masking_checks(correct: Mapping[str, int], clean: int, n: int, plan: Sequence[AttackSpec], cfg: SuiteConfig, *,
                   zero_grad_share: float, n_classes: int, ra: bool, randomized_batches: int, n_batches: int,
                   probe: GradientProbe | None, autoattack_flags: Sequence[str],
                   suspicious_batches: int = 0, autoattack_examples: int | None = None) -> list[Check]:
    """The checks' verdicts, decided on example counts: ``correct[attack]`` examples of ``n`` survived
    each attack, ``clean`` were right without one; the slack is :func:`tolerance_examples`.
    ``autoattack_examples``: the examples AutoAttack ran on (the check examples and the cascade's
    survivors; default ``n``), what its own zero-gradient count is weighed against."""
    tol, k = tolerance_examples(cfg.tol, n), cfg.pgd_steps
    main = [s for s in plan if s.in_worst_case]
    checks: list[Check] = []

    def frac(c: int) -> float:
        return c / max(1, n)

    over = {s.name: frac(correct[s.name]) for s in main if correct[s.name] > clean + tol}
    checks.append(Check(
        CheckName.ROBUST_LE_CLEAN, not over,
        "No attack may leave more examples correct than no attack: robust accuracy above clean "
        "accuracy means the attacks are not working (e.g. masked gradients).",
        {"clean": frac(clean), "above_clean": over, "n": n, "tolerance_examples": tol}))

    a1, a2 = correct[f"pgd{k}_final"], correct[f"pgd{2 * k}_final"]
    checks.append(Check(
        CheckName.MORE_STEPS_NOT_WEAKER, a2 <= a1 + tol,
        f"PGD-{2 * k} must be at least as strong as PGD-{k}; if not, the loss surface is not being "
        "followed (masked or noisy gradients).",
        {f"pgd{k}": frac(a1), f"pgd{2 * k}": frac(a2), f"pgd{k}_correct": a1, f"pgd{2 * k}_correct": a2, "n": n,
         "tolerance_examples": tol}))

    sweep = [(s.eps, correct[s.name]) for s in plan if s.kind is AttackKind.SWEEP]
    monotone = all(b <= a + tol for (_, a), (_, b) in zip(sweep, sweep[1:], strict=False))
    chance = 1.0 / n_classes
    at_max = sweep[-1][1]
    checks.append(Check(
        CheckName.EPS_TO_CHANCE, monotone and at_max <= math.ceil(chance * n) + tol,
        "Accuracy must fall as eps grows and reach chance (or below) when eps allows any image "
        "(eps = 1): a gradient attack that cannot do that is being blocked.",
        {"accuracy_by_eps": {f"{e:.4g}": frac(c) for e, c in sweep}, "chance": chance, "monotone": monotone,
         "n": n, "tolerance_examples": tol}))

    gradient = {s.name: correct[s.name] for s in main if s.gradient}
    best_white_name = min(gradient, key=gradient.__getitem__)
    best_white = gradient[best_white_name]
    square = [s.name for s in main if s.kind is AttackKind.SQUARE]
    checks.append(Check(
        CheckName.WHITEBOX_BEATS_SQUARE, (best_white <= correct[square[0]] + tol) if square else None,
        "Square, a gradient-free attack run on its own, must not beat the best gradient attack "
        "(PGD, APGD, C&W, FGSM, MIM, on any target); if it does, the gradients mislead them.",
        {"best_gradient_attack": best_white_name, "best_gradient": frac(best_white),
         "square": frac(correct[square[0]]) if square else None,
         "batches_with_more_queries": suspicious_batches, "queries_there": cfg.square_queries_suspicious,
         "n": n, "tolerance_examples": tol}))

    transfer = [s.name for s in main if s.kind in TRANSFER_KINDS]
    best_transfer = min(correct[t] for t in transfer) if transfer else None
    checks.append(Check(
        CheckName.WHITEBOX_BEATS_TRANSFER, (best_white <= best_transfer + tol) if best_transfer is not None else None,
        "AEs transferred from another model must not beat the gradient attacks on this one.",
        {"best_gradient": frac(best_white), "best_transfer": None if best_transfer is None else frac(best_transfer),
         "n": n, "tolerance_examples": tol}))

    checks.append(Check(
        CheckName.NO_ZERO_GRADIENTS, zero_grad_share <= 0.01,
        "Examples whose input gradient of the loss is exactly zero give a gradient attack nothing "
        "to follow (saturated softmax, non-differentiable preprocessing).", {"share_zero_gradient": zero_grad_share}))

    if probe is None or probe.cosine.numel() == 0:
        checks.append(Check(CheckName.GRADIENT_SANITY, None, "Not run (grad_check_examples = 0).", {}))
    else:
        n_info, med_cos, rise = probe.summary()
        checks.append(Check(
            CheckName.GRADIENT_SANITY, probe.sane,
            "The input gradient must describe the model: its directional derivatives must agree with "
            "finite differences along random directions (median cosine >= 0.5), and a small step "
            "along its sign must raise the margin (>= 80% of examples). A gradient replaced by noise, "
            "or none at all, fails.",
            {"examples": int(probe.informative.numel()), "informative": n_info, "median_cosine": med_cos,
             "loss_rises": rise}))

    checks.append(Check(
        CheckName.DETERMINISTIC, randomized_batches == 0,
        "The same input must give the same logits and gradients. Where it does not, the gradient attacks "
        f"run with EOT over {cfg.eot_samples} samples and AutoAttack's 'rand' version, but robustness claims "
        "for randomised defences need their own adaptive evaluation.",
        {"randomised_batches": randomized_batches, "batches": n_batches}))

    if ra:
        adaptive = {s.name: correct[s.name] for s in main if s.target in SURROGATES}
        final_gradient = {s.name: correct[s.name] for s in main if _final_only(s) and s.gradient}
        best_final = min(final_gradient.values())
        best_adaptive = min(adaptive.values()) if adaptive else None
        checks.append(Check(
            CheckName.FINAL_OUTPUT_NOT_MASKED,
            (best_final <= best_adaptive + tol) if best_adaptive is not None else None,
            "Gradient attacks on the final output P' must be as strong as adaptive attacks through "
            "the RA gate (aux P, P + P', label gate, straight-through and soft gates); if these do "
            "better, numbers from attacking P' alone overestimate robustness.",
            {"best_final": frac(best_final), "best_adaptive": None if best_adaptive is None else frac(best_adaptive),
             "adaptive": {k_: frac(v) for k_, v in adaptive.items()}, "n": n, "tolerance_examples": tol},
            scope="final"))

    if cfg.autoattack:
        ran_on = autoattack_examples if autoattack_examples is not None else n
        for fragment, (name, scope) in _AA_FLAGS.items():
            raised = sorted({f for f in autoattack_flags if fragment in f})
            if name == CheckName.AUTOATTACK_ZERO_GRADIENTS:
                # AutoAttack flags a single point; the suite's own rule (no_zero_gradients) allows 1%.
                raised = [f for f in raised if _count(f) is None or _count(f) > 0.01 * max(1, ran_on)]
            if name == CheckName.AUTOATTACK_SQUARE:
                # AutoAttack flags any example Square adds after its gradient attacks (0.2%); apply
                # the suite's tolerance in examples. On RA models it concerns P' alone.
                raised = [f for f in raised if _percent(f) is None or _percent(f) / 100 * ran_on > tol + 0.5]
                scope = "final" if ra else "all"
            checks.append(Check(
                name, not raised, f"AutoAttack's own check ({fragment!r}) must stay silent; it raised: "
                f"{raised[0] if raised else 'nothing'}", {"messages": raised}, scope=scope))
    return checks


def _count(message: str) -> int | None:
    """The number of points in AutoAttack's zero-gradient message ("there are 2 points with ...")."""
    import re

    m = re.search(r"there are (\d+) points", message)
    return int(m.group(1)) if m else None


def _percent(message: str) -> float | None:
    """The first percentage in an AutoAttack message ("... decreased the robust accuracy of 4.80%")."""
    import re

    m = re.search(r"([0-9.]+)%", message)
    return float(m.group(1)) if m else None
