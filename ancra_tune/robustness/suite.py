"""What an evaluation runs: the suite's settings (validated like every config) and its attack plan.

Every attack names what it attacked (its *target*):

  final      the final output P' (what the paper's Table II attacks)
  aux        the last RA block's auxiliary output P
  sum        P' and every auxiliary P together (the paper's adaptive total loss; for APGD the
             logits sum_h log softmax(P_h), a product of the heads' distributions)
  labelgate  P' with the RA gate fixed to the true label (the training-time gate)
  stgate     P' with the argmax gate's backward pass replaced by softmax(P / T) @ W (straight-
             through BPDA: forward values unchanged)
  softgate   P' with the gate replaced by softmax(P / T) @ W in forward and backward (a smooth
             surrogate model)
  black-box  Square (no gradients)
  source     transfer: crafted on another model

Every accuracy is that of the model's real prediction (P' gated by its own argmax) on the
attack's examples; attacks on a surrogate keep every point they visit that fools the real model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..config import ConfigError, build_dataclass, check_choice, check_field


class AttackKind(StrEnum):
    """How an attack searches (``robustness.runner.ATTACKS`` maps each to its function)."""

    FGSM = "fgsm"
    PGD = "pgd"
    CW = "cw"
    MIM = "mim"
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"
    SQUARE = "square"
    AUTOATTACK = "autoattack"
    TRANSFER_PGD = "transfer_pgd"
    TRANSFER_MIM = "transfer_mim"
    SWEEP = "sweep"  # PGD at another eps (the eps sweep; not in the worst case)


class Target(StrEnum):
    """What an attack attacked (the module docstring says each)."""

    FINAL = "final"
    AUX = "aux"
    SUM = "sum"
    LABELGATE = "labelgate"
    STGATE = "stgate"
    SOFTGATE = "softgate"
    BLACK_BOX = "black-box"
    SOURCE = "source"


def named(enum: type[StrEnum], value: Any, what: str) -> Any:
    """``enum(value)``, refusing an unknown value by naming the known ones."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(m.value for m in enum)}") from None


SURROGATES = (Target.AUX, Target.SUM, Target.LABELGATE, Target.STGATE, Target.SOFTGATE)
TARGETS = (Target.FINAL, *SURROGATES)
PRESET_NAMES = ("full", "quick")
#: attack kinds that follow the model's input gradient (the white-box side of the masking checks)
GRADIENT_KINDS = (AttackKind.FGSM, AttackKind.PGD, AttackKind.CW, AttackKind.MIM, AttackKind.APGD_CE,
                  AttackKind.APGD_T)
TRANSFER_KINDS = (AttackKind.TRANSFER_PGD, AttackKind.TRANSFER_MIM)


@dataclass(frozen=True)
class SuiteConfig:
    """What the evaluation runs. ``quick`` is for sweeps (fewer iterations, never fewer
    surrogates); ``full`` for final numbers."""

    preset: str = "full"
    n_examples: int | None = None  # None: the whole split
    eps: float = 8 / 255
    step_size: float | None = None  # None: eps / 4 (0.0078 at 8/255, the paper's 0.007 scale)
    pgd_steps: int = 40  # PGD-k; the doubling check also runs PGD-2k
    cw_steps: int = 40
    mim_steps: int = 40
    mim_momentum: float = 1.0
    adaptive: bool = True  # attacks through every surrogate of the RA gate (RA models)
    adaptive_steps: int = 40  # fixed-step PGD on each surrogate
    apgd_iters: int = 100  # APGD-CE and APGD-T (DLR) on each surrogate: AutoAttack's schedule
    apgd_restarts: int = 1
    apgd_targets: int = 9  # APGD-T target classes (capped at K - 1)
    gate_temperature: float = 1.0  # T of the soft and straight-through gates
    sweep_eps: tuple[float, ...] | None = None  # None: eps, 2 eps, 8 eps, 1.0
    sweep_steps: int = 20
    square_queries: int = 1000  # the separate Square run of the white-box vs black-box check; 0: off
    # Square's queries on a batch whose probes find the gradients broken (zero, insane or random):
    # there only a gradient-free attack can tell the truth, so it gets AutoAttack's full budget.
    square_queries_suspicious: int = 5000
    autoattack: str | None = "standard"  # "standard", a comma list of AutoAttack attacks, or None
    transfer_steps: int = 100  # PGD-T and MIM-T on the source model, when one is given
    eot_samples: int = 20  # gradient samples per step when the model turns out to be randomised
    grad_check_examples: int = 16  # per batch, for the gradient-sanity check
    grad_check_directions: int = 8
    batch_size: int = 250
    seed: int = 0
    tol: float = 0.02  # accuracy slack of the checks (sampling noise on a few hundred examples)
    # Every attack runs on the first `check_examples` examples (the masking checks and each attack's
    # own accuracy are measured there, with their own n); beyond them an attack runs only on the
    # examples every attack before it left correct (a cascade, as AutoAttack's), so the worst case
    # costs in proportion to the surviving examples. None: every attack on every example.
    check_examples: int | None = 200
    features: bool = True
    embedding_max: int = 1000
    # The features' 2-D picture: t-SNE (UMAP when installed), or PCA, a linear projection in
    # milliseconds (the quick preset: a sweep draws one per finished trial; t-SNE takes ~1 s each)
    embedding: str = "tsne"

    def __post_init__(self) -> None:
        s = "eval"
        check_choice(s, "preset", self.preset, PRESET_NAMES)
        check_choice(s, "embedding", self.embedding, ("tsne", "pca"))
        check_field(self.eps > 0, s, "eps", self.eps, "> 0")
        if self.step_size is not None:
            check_field(self.step_size > 0, s, "step_size", self.step_size, "> 0 or null (eps / 4)")
        for name in ("pgd_steps", "cw_steps", "mim_steps", "adaptive_steps", "sweep_steps", "apgd_iters",
                     "apgd_restarts", "apgd_targets", "eot_samples", "grad_check_directions", "batch_size"):
            check_field(getattr(self, name) >= 1, s, name, getattr(self, name), ">= 1")
        for name in ("square_queries", "square_queries_suspicious", "transfer_steps", "grad_check_examples",
                     "embedding_max"):
            check_field(getattr(self, name) >= 0, s, name, getattr(self, name), ">= 0")
        if self.check_examples is not None:
            check_field(self.check_examples >= 1, s, "check_examples", self.check_examples,
                        ">= 1, or null (every attack on every example)")
        if self.n_examples is not None:
            check_field(self.n_examples >= 1, s, "n_examples", self.n_examples, ">= 1 or null (the whole split)")
        check_field(self.gate_temperature > 0, s, "gate_temperature", self.gate_temperature, "> 0")
        check_field(self.tol >= 0, s, "tol", self.tol, ">= 0")
        if self.sweep_eps is not None:
            check_field(len(self.sweep_eps) > 0 and all(e > 0 for e in self.sweep_eps), s, "sweep_eps",
                        self.sweep_eps, "a non-empty list of numbers > 0, or null")
        if self.autoattack is not None and self.autoattack != "standard":
            known = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")
            for a in self.autoattack_list:
                check_choice(s, "autoattack", a, ("standard", *known))

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> SuiteConfig:
        check_choice("eval", "preset", name, PRESET_NAMES)
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], *, section: str = "eval",
                     defaults: Mapping[str, Any] | None = None) -> SuiteConfig:
        """From a study file's ``eval`` section or another mapping: ``preset`` (default quick) and
        overrides of its fields, coerced and validated like training configs (``eps: 8/255`` is a
        number; a wrong key or value fails with the section, the key and what is allowed).
        ``defaults`` fill fields the mapping leaves out (e.g. the training eps)."""
        d = dict(d)
        preset = d.pop("preset", "quick")
        check_choice(section, "preset", preset, PRESET_NAMES)
        base = {k: v for k, v in dataclasses.asdict(PRESETS[preset]).items()}
        base.update(defaults or {})
        base.update(d)
        try:
            return build_dataclass(cls, base, section)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a list where a number belongs
            raise ConfigError(f"{section}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 4

    @property
    def sweep(self) -> tuple[float, ...]:
        if self.sweep_eps is not None:
            return tuple(self.sweep_eps)
        return tuple(sorted({min(1.0, self.eps * m) for m in (1, 2, 8)} | {1.0}))

    @property
    def autoattack_list(self) -> tuple[str, ...]:
        if self.autoattack is None:
            return ()
        return tuple(a.strip() for a in self.autoattack.split(",") if a.strip())


PRESETS: dict[str, SuiteConfig] = {
    "full": SuiteConfig(),
    "quick": SuiteConfig(preset="quick", n_examples=500, pgd_steps=10, cw_steps=10, mim_steps=10, adaptive_steps=10,
                         apgd_iters=20, apgd_targets=3, sweep_steps=10, square_queries=200,
                         autoattack="apgd-ce,apgd-t", transfer_steps=20, eot_samples=5, grad_check_examples=8,
                         embedding_max=300, embedding="pca", check_examples=64),
}


@dataclass(frozen=True)
class AttackSpec:
    name: str
    kind: AttackKind
    target: Target
    steps: int
    eps: float
    in_worst_case: bool = True  # attacks at the evaluation budget; the eps sweep is not
    continues: str | None = None  # the attack whose last iterate this one starts from (PGD-2k after PGD-k)

    def __post_init__(self) -> None:  # a report read back from JSON gives strings: the enums refuse unknown ones
        object.__setattr__(self, "kind", named(AttackKind, self.kind, "attack kind"))
        object.__setattr__(self, "target", named(Target, self.target, "attack target"))

    @property
    def gradient(self) -> bool:
        """Follows the model's own input gradient (white-box, not a bundle with Square in it)."""
        return self.kind in GRADIENT_KINDS


def plan_attacks(cfg: SuiteConfig, *, ra: bool, has_source: bool) -> list[AttackSpec]:
    """The attacks of one evaluation, in the order they run (the order fixes their randomness)."""
    e, k = cfg.eps, cfg.pgd_steps
    plan = [AttackSpec("fgsm_final", AttackKind.FGSM, Target.FINAL, 1, e),
            AttackSpec(f"pgd{k}_final", AttackKind.PGD, Target.FINAL, k, e),
            AttackSpec(f"pgd{2 * k}_final", AttackKind.PGD, Target.FINAL, 2 * k, e, continues=f"pgd{k}_final"),
            AttackSpec(f"cw{cfg.cw_steps}_final", AttackKind.CW, Target.FINAL, cfg.cw_steps, e),
            AttackSpec(f"mim{cfg.mim_steps}_final", AttackKind.MIM, Target.FINAL, cfg.mim_steps, e)]
    if ra and cfg.adaptive:
        for t in SURROGATES:
            plan += [AttackSpec(f"pgd{cfg.adaptive_steps}_{t}", AttackKind.PGD, t, cfg.adaptive_steps, e),
                     AttackSpec(f"apgd-ce_{t}", AttackKind.APGD_CE, t, cfg.apgd_iters, e),
                     AttackSpec(f"apgd-t_{t}", AttackKind.APGD_T, t, cfg.apgd_iters, e)]
    if cfg.square_queries > 0:
        q = cfg.square_queries
        plan.append(AttackSpec(f"square{q}", AttackKind.SQUARE, Target.BLACK_BOX, q, e))
    if has_source and cfg.transfer_steps > 0:
        t = cfg.transfer_steps
        plan += [AttackSpec(f"transfer_pgd{t}", AttackKind.TRANSFER_PGD, Target.SOURCE, t, e),
                 AttackSpec(f"transfer_mim{t}", AttackKind.TRANSFER_MIM, Target.SOURCE, t, e)]
    if cfg.autoattack:
        name = "autoattack_" + "+".join(cfg.autoattack_list)
        plan.append(AttackSpec(name, AttackKind.AUTOATTACK, Target.FINAL, 0, e))
    plan += [AttackSpec(f"sweep_pgd{cfg.sweep_steps}_eps{s:.4g}", AttackKind.SWEEP, Target.FINAL, cfg.sweep_steps, s,
                        in_worst_case=False) for s in cfg.sweep]
    return plan


#: the order the worst case's cascade runs its attacks in, cheap and strong first: FGSM (one
#: gradient) takes the easy examples; through RA's gate the soft and straight-through surrogates
#: break RA models where attacks on P' fail (APGD-CE on the soft gate was the strongest single
#: attack on the project's RA models: benchmarks/eval_cost.py prints each attack's kills); then P',
#: the targeted and remaining surrogates, and the expensive ones (Square, transfer, AutoAttack) on
#: what is left.
_KIND_RANK = {AttackKind.FGSM: 0, AttackKind.APGD_CE: 1, AttackKind.PGD: 2, AttackKind.APGD_T: 3,
              AttackKind.CW: 4, AttackKind.MIM: 5, AttackKind.TRANSFER_PGD: 6, AttackKind.TRANSFER_MIM: 7,
              AttackKind.SQUARE: 8, AttackKind.AUTOATTACK: 9, AttackKind.SWEEP: 10}
_TARGET_RANK = {Target.SOFTGATE: 0, Target.STGATE: 1, Target.FINAL: 2, Target.SUM: 3, Target.AUX: 4,
                Target.LABELGATE: 5, Target.BLACK_BOX: 6, Target.SOURCE: 6}


def cascade_order(plan: list[AttackSpec]) -> list[int]:
    """Indices of ``plan`` in the order the cascade runs them (each attack keeps its plan index, which
    fixes its randomness). An attack that continues another runs right after it."""
    def rank(i: int) -> tuple[int, int, int, int]:
        s = plan[i]
        if not s.in_worst_case:
            return (4, 0, 0, i)
        if s.kind is AttackKind.FGSM:
            return (0, 0, 0, i)
        if s.kind in (AttackKind.SQUARE, AttackKind.AUTOATTACK, *TRANSFER_KINDS):
            return (3, _KIND_RANK[s.kind], 0, i)
        tier = 2 if s.kind in (AttackKind.APGD_T, AttackKind.CW, AttackKind.MIM) else 1
        return (tier, _TARGET_RANK[s.target], _KIND_RANK[s.kind], i)

    order = sorted(range(len(plan)), key=rank)
    names = {s.name: i for i, s in enumerate(plan)}
    for i, s in enumerate(plan):  # a continuation goes right after what it continues
        if s.continues in names:
            order.remove(i)
            order.insert(order.index(names[s.continues]) + 1, i)
    return order
