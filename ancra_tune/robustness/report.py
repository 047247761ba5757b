"""The evaluation's one result: :class:`EvalReport`, built from per-batch outcomes.

It knows its metrics, its MLflow tags, which metrics its checks flag and why, and the value a
selection may credit a trial with. Every layer above (the Ray worker, the study summary,
``ancra-tune best``, MLflow tracking) reads this object; JSON exists only where it leaves the
program (``report.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..negatives import select_negatives
from . import stats
from .checks import Check, GradientProbe, masking_checks, tolerance_examples
from .suite import AttackKind, AttackSpec, SuiteConfig, Target, named, plan_attacks

ROBUST_PREFIX = "acc_"
CLEAN, WORST, AUTOATTACK = "clean_acc", "robust_acc_worst", "autoattack_acc"


@dataclass
class BatchResult:
    """Per-example outcomes of one batch: correctness per attack on its check examples (every attack
    ran on them), the worst case on every example, and what the probes found."""

    batch_idx: int
    clean: Tensor
    correct: dict[str, Tensor]  # per attack, on the batch's check examples
    zero_grad: Tensor
    check: Tensor | None = None  # (B,) the check examples (None: all)
    worst: Tensor | None = None  # (B,) survived every attack at the budget (the cascade's result)
    attacked: dict[str, int] = field(default_factory=dict)  # examples each attack ran on
    feat_nat: Tensor | None = None
    feat_adv: Tensor | None = None
    labels: Tensor | None = None
    flags: list[str] = field(default_factory=list)  # AutoAttack's own warnings
    randomized: bool = False
    probe: GradientProbe | None = None
    suspicious: bool = False  # the probes found the gradients broken: Square ran with its larger budget

    def to_state(self) -> dict[str, Any]:
        """Plain tensors and builtins (``torch.save`` / ``torch.load(weights_only=True)``): a batch
        kept on disk while an evaluation runs, so a stopped one goes on from its next batch."""
        state = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "probe"}
        state["correct"], state["attacked"], state["flags"] = dict(self.correct), dict(self.attacked), list(self.flags)
        if self.probe is not None:
            state["probe"] = {"cosine": self.probe.cosine, "rises": self.probe.rises,
                              "informative": self.probe.informative}
        return state

    def to(self, device: str | torch.device) -> BatchResult:
        """The same outcomes with every tensor on ``device`` (a worker's batch, computed on its GPU,
        goes back to a driver that may have none)."""
        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(t) for k, t in v.items()}
            if isinstance(v, GradientProbe):
                return GradientProbe(move(v.cosine), move(v.rises), move(v.informative))
            return v

        return BatchResult(**{f: move(getattr(self, f)) for f in self.__dataclass_fields__})

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BatchResult:
        fields = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        if fields.get("probe") is not None:
            fields["probe"] = GradientProbe(**fields["probe"])
        return cls(**fields)


@dataclass(frozen=True)
class AttackResult:
    name: str
    kind: AttackKind
    target: Target
    steps: int
    eps: float
    in_worst_case: bool
    accuracy: float  # on the report's check examples (all of them when check_examples is None)
    beaten_by: str | None = None  # another single attack beats this one by more than the tolerance
    n: int | None = None  # examples the accuracy is measured on (None: the report's n_examples)
    attacked: int | None = None  # examples it ran on in all (the check examples and the cascade's survivors)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", named(AttackKind, self.kind, "attack kind"))
        object.__setattr__(self, "target", named(Target, self.target, "attack target"))

    @property
    def metric(self) -> str:
        return ROBUST_PREFIX + self.name

    @property
    def spec(self) -> AttackSpec:
        return AttackSpec(self.name, self.kind, self.target, self.steps, self.eps, self.in_worst_case)


@dataclass(frozen=True)
class EvalReport:
    suite: SuiteConfig
    n_examples: int
    ra: bool
    n_classes: int
    clean_acc: float
    robust_acc_worst: float
    attacks: tuple[AttackResult, ...]
    checks: tuple[Check, ...]
    autoattack_flags: tuple[str, ...] = ()
    per_example: Mapping[str, list[bool]] = field(default_factory=dict)  # clean, worst: all n; attacks: check
    features: Mapping[str, Any] | None = None
    artifacts: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    check_examples: int | None = None  # examples every attack ran on (None: all n_examples)

    # ------------------------------------------------------------------ reading

    @property
    def n_check(self) -> int:
        return self.n_examples if self.check_examples is None else self.check_examples

    def n_of(self, name: str) -> int:
        """Examples behind ``name``'s accuracy: clean and the worst case on all, an attack on the check
        examples."""
        if name in ("clean", "worst"):
            return self.n_examples
        a = next((a for a in self.attacks if a.name == name), None)
        return self.n_examples if a is None or a.n is None else a.n

    @property
    def eps(self) -> float:
        return self.suite.eps

    @property
    def autoattack_acc(self) -> float | None:
        return next((a.accuracy for a in self.attacks if a.kind is AttackKind.AUTOATTACK), None)

    @property
    def checks_passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def masked_metrics(self) -> list[str]:
        """Attacks another single attack of this report beats by more than the tolerance."""
        return sorted(a.name for a in self.attacks if a.beaten_by)

    def outcomes(self, name: str) -> list[bool] | None:
        """Which examples survived ``name`` (an attack, ``clean`` or ``worst``); None if not kept."""
        v = self.per_example.get(name)
        return None if v is None else list(v)

    def attack(self, name: str) -> AttackResult:
        return next(a for a in self.attacks if a.name == name)

    def flags(self, metric: str) -> list[str]:
        """Why ``metric`` cannot be trusted as robustness (empty: it can): the failing checks whose
        scope covers it (a check says the attack was fooled)."""
        if metric == CLEAN or not self.is_robust_metric(metric):
            return []
        reasons = [f"check {c.name} failed" for c in self.checks if c.failed and c.scope == "all"]
        attack = self._attack_of(metric)
        final_only = (attack is not None and attack.target is Target.FINAL) or metric == AUTOATTACK
        if final_only:
            reasons += [f"check {c.name} failed (P' alone is masked)" for c in self.checks
                        if c.failed and c.scope == "final"]
        # An attack that another one beats is weaker, not fooled: that alone flags nothing (a flag on
        # every cell reads as noise). ``beaten_by`` stays in the report as information.
        return reasons

    @property
    def flagged(self) -> bool:
        """True when the checks flag the worst case itself (a failing check of scope ``all``)."""
        return bool(self.flags(WORST))

    def credible(self, metric: str) -> float | None:
        """The value a selection may credit: the metric where the checks trust it, else the lowest
        credible figure, the worst case over every attack (black-box included)."""
        value = self.metrics().get(metric)
        if value is None or not self.flags(metric) or metric == WORST:
            return value
        return min(value, self.robust_acc_worst)

    def is_robust_metric(self, metric: str) -> bool:
        return metric in (WORST, AUTOATTACK) or (metric.startswith(ROBUST_PREFIX) and self._attack_of(metric)
                                                  is not None)

    def _attack_of(self, metric: str) -> AttackResult | None:
        if not metric.startswith(ROBUST_PREFIX):
            return None
        return next((a for a in self.attacks if a.name == metric[len(ROBUST_PREFIX):]), None)

    # ------------------------------------------------------------------ leaving the program

    def metrics(self) -> dict[str, float]:
        """Flat numbers for Tune and MLflow."""
        out = {CLEAN: self.clean_acc, WORST: self.robust_acc_worst}
        for a in self.attacks:
            out[a.metric] = a.accuracy
        if self.autoattack_acc is not None:
            out[AUTOATTACK] = self.autoattack_acc
        out["checks_passed"] = float(self.checks_passed)
        out["eval_flagged"] = float(self.flagged)
        out["eval_n_examples"] = float(self.n_examples)
        out["eval_check_examples"] = float(self.n_check)
        return out

    def tags(self) -> dict[str, str]:
        """MLflow tags: each check's verdict, what each attack attacked, what is flagged and why."""
        tags = {"ancra.masked_metrics": ",".join(self.masked_metrics) or "none",
                "ancra.checks_passed": str(self.checks_passed).lower(),
                "ancra.flagged": "; ".join(self.flags(WORST)) or "none"}
        for c in self.checks:
            tags[f"check.{c.name}"] = c.verdict
        for a in self.attacks:
            tags[f"attack.{a.name}"] = f"{a.kind} on {a.target}"
        return tags

    def to_dict(self, per_example: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            **dict(self.meta), "n_examples": self.n_examples, "eps": self.eps, "preset": self.suite.preset,
            "ra": self.ra, "n_classes": self.n_classes, "suite": self.suite.to_dict(),
            CLEAN: self.clean_acc, WORST: self.robust_acc_worst, AUTOATTACK: self.autoattack_acc,
            "check_examples": self.n_check,
            "attacks": [{"name": a.name, "kind": a.kind, "target": a.target, "steps": a.steps, "eps": a.eps,
                         "in_worst_case": a.in_worst_case, "accuracy": a.accuracy, "beaten_by": a.beaten_by,
                         "n": a.n, "attacked": a.attacked}
                        for a in self.attacks],
            "masked_metrics": self.masked_metrics, "checks": [c.to_dict() for c in self.checks],
            "checks_passed": self.checks_passed, "flagged": self.flags(WORST),
            "autoattack_flags": list(self.autoattack_flags)}
        if per_example:  # which examples survived each attack (and clean, and the worst case), packed
            d["per_example"] = {"encoding": stats.PACKING, "n": self.n_examples, "check_examples": self.n_check,
                                "outcomes": {k: stats.pack(v) for k, v in self.per_example.items()}}
        if self.features is not None:
            d["features"] = dict(self.features)
        if self.artifacts:
            d["artifacts"] = list(self.artifacts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        known = {"n_examples", "check_examples", "eps", "preset", "ra", "n_classes", "suite", CLEAN, WORST, AUTOATTACK,
                 "attacks",
                 "masked_metrics", "checks", "checks_passed", "flagged", "autoattack_flags", "per_example",
                 "features", "artifacts"}
        return cls(suite=SuiteConfig.from_mapping(d["suite"], section="report.suite"), n_examples=int(d["n_examples"]),
                   ra=bool(d["ra"]), n_classes=int(d["n_classes"]), clean_acc=float(d[CLEAN]),
                   robust_acc_worst=float(d[WORST]),
                   attacks=tuple(AttackResult(**a) for a in d["attacks"]),
                   checks=tuple(Check.from_dict(c) for c in d["checks"]),
                   autoattack_flags=tuple(d.get("autoattack_flags", ())), per_example=_outcomes(d.get("per_example")),
                   features=d.get("features"), artifacts=tuple(d.get("artifacts", ())),
                   meta={k: v for k, v in d.items() if k not in known}, check_examples=d.get("check_examples"))

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        import json

        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> Path:
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _outcomes(stored: Any) -> dict[str, list[bool]]:
    """Per-example outcomes as report.json stores them: packed (this version) or lists (older ones)."""
    if not stored:
        return {}
    if isinstance(stored, Mapping) and stored.get("encoding") == stats.PACKING:
        n, n_check = int(stored["n"]), int(stored.get("check_examples", stored["n"]))
        return {k: stats.unpack(v, n if k in ("clean", "worst") else n_check).tolist()
                for k, v in stored["outcomes"].items()}
    return {k: [bool(b) for b in v] for k, v in stored.items()}


# --------------------------------------------------------------------------- building


def _stats(v: Tensor) -> dict[str, float]:
    v = v.double()
    if v.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "p05": math.nan, "median": math.nan, "p95": math.nan}
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": v.mean().item(), "std": v.std().item() if v.numel() > 1 else 0.0,
            "p05": q[0], "median": q[1], "p95": q[2]}


def feature_pairs(feat_nat: Tensor, feat_adv: Tensor, labels: Tensor, seed: int) -> dict[str, Tensor]:
    """Cosine similarity and L2 distance of positive pairs (x, x^a: Alignment) and negative pairs
    (x and a random example of another class: Exclusion). Each (N,)."""
    sel = select_negatives(labels, strategy="random", random_draw="example",
                           generator=torch.Generator().manual_seed(seed))
    neg = feat_nat[sel.index]
    ok = sel.valid
    return {"pp_cos": F.cosine_similarity(feat_nat, feat_adv, dim=1),
            "pp_l2": (feat_nat - feat_adv).norm(dim=1),
            "np_cos": F.cosine_similarity(feat_nat, neg, dim=1)[ok],
            "np_l2": (feat_nat - neg).norm(dim=1)[ok]}


def _merge_probes(results: Sequence[BatchResult]) -> GradientProbe | None:
    probes = [r.probe for r in results if r.probe is not None]
    if not probes:
        return None
    return GradientProbe(cosine=torch.cat([p.cosine for p in probes]), rises=torch.cat([p.rises for p in probes]),
                         informative=torch.cat([p.informative for p in probes]))


def build_report(results: Sequence[BatchResult], cfg: SuiteConfig, *, ra: bool, n_classes: int,
                 has_source: bool, meta: Mapping[str, Any] | None = None) -> EvalReport:
    """Merge per-batch results (any order, e.g. from several workers) into the report. It draws
    nothing: :func:`.plots.draw_report` adds the figures."""
    results = sorted(results, key=lambda r: r.batch_idx)
    plan = plan_attacks(cfg, ra=ra, has_source=has_source)
    clean = torch.cat([r.clean for r in results])
    checks_of = [r.check if r.check is not None else torch.ones_like(r.clean) for r in results]
    in_check = torch.cat(checks_of)
    correct = {s.name: torch.cat([r.correct[s.name] for r in results]) for s in plan}  # on the check examples
    zero = torch.cat([r.zero_grad for r in results])
    if all(r.worst is not None for r in results):
        worst = torch.cat([r.worst for r in results])  # type: ignore[misc]
    else:  # results of an older runner: every attack ran on every example
        worst = clean.clone()
        for s in plan:
            if s.in_worst_case:
                worst &= correct[s.name]
    n, n_check = clean.numel(), int(in_check.sum().item())
    acc = {k: v.float().mean().item() for k, v in correct.items()}
    counts = {k: int(v.sum().item()) for k, v in correct.items()}
    clean_check = int(clean[in_check].sum().item())
    clean_acc, worst_acc = clean.float().mean().item(), worst.float().mean().item()
    flags = tuple(sorted({f for r in results for f in r.flags}))
    attacked = {s.name: sum(r.attacked.get(s.name, r.clean.numel()) for r in results) for s in plan}
    aa_ran = next((attacked[s.name] for s in plan if s.kind is AttackKind.AUTOATTACK), None)
    checks = masking_checks(counts, clean_check, n_check, plan, cfg, zero_grad_share=zero.float().mean().item(),
                            n_classes=n_classes, ra=ra, randomized_batches=sum(r.randomized for r in results),
                            n_batches=len(results), probe=_merge_probes(results), autoattack_flags=flags,
                            suspicious_batches=sum(r.suspicious for r in results), autoattack_examples=aa_ran)
    tol = tolerance_examples(cfg.tol, n_check)
    main = [s.name for s in plan if s.in_worst_case]
    beaten_by: dict[str, str] = {}
    for name in main:
        rival = min((m for m in main if m != name), key=lambda m: counts[m], default=None)
        if rival is not None and counts[name] > counts[rival] + tol:
            beaten_by[name] = rival
    attacks = tuple(AttackResult(name=s.name, kind=s.kind, target=s.target, steps=s.steps, eps=s.eps,
                                 in_worst_case=s.in_worst_case, accuracy=acc[s.name], beaten_by=beaten_by.get(s.name),
                                 n=n_check, attacked=attacked[s.name])
                    for s in plan)
    features = None
    merged = merged_features(results, cfg)
    if merged is not None:
        pairs = merged[-1]
        features = {**{k: _stats(v) for k, v in pairs.items()}, "adversary": f"pgd{cfg.pgd_steps}_final"}
    return EvalReport(suite=cfg, n_examples=n, ra=ra, n_classes=n_classes, clean_acc=clean_acc,
                      robust_acc_worst=worst_acc, attacks=attacks, checks=tuple(checks), autoattack_flags=flags,
                      per_example={"clean": clean.tolist(), "worst": worst.tolist(),
                                   **{k: v.tolist() for k, v in correct.items()}},
                      features=features, artifacts=(), meta=dict(meta or {}), check_examples=n_check)


def merged_features(results: Sequence[BatchResult], cfg: SuiteConfig
                    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]] | None:
    """(natural features, adversarial features, labels, pairs) over the check examples of every batch
    in order, or None when the evaluation kept no features."""
    results = [r for r in results if r.check is None or bool(r.check.any())]  # batches past the check examples
    if not (cfg.features and results and all(r.feat_nat is not None for r in results)):
        return None
    results = sorted(results, key=lambda r: r.batch_idx)
    fn = torch.cat([r.feat_nat for r in results])  # type: ignore[misc]
    fa = torch.cat([r.feat_adv for r in results])  # type: ignore[misc]
    labels = torch.cat([r.labels if r.check is None else r.labels[r.check]  # type: ignore[index]
                        for r in results])
    return fn, fa, labels, feature_pairs(fn, fa, labels, cfg.seed)


# --------------------------------------------------------------------------- text


def format_report(report: EvalReport) -> str:
    """A readable table of accuracies, what each attack targeted, and the checks' verdicts."""
    n, nc = report.n_examples, report.n_check
    lines = [f"clean accuracy            {report.clean_acc:.4f}   ({n} examples, eps {report.eps:.4g})",
             f"each attack's accuracy on the first {nc} examples (every attack ran on them; the checks use them)"
             + ("" if nc == n else "; beyond them an attack ran only on the examples the attacks before it "
                                   "left correct (the worst case's cascade)"),
             f"{'attack':<28}{'target':<12}{'accuracy':>9}{'ran on':>8}"]
    for a in report.attacks:
        mark = "" if a.in_worst_case else "  (eps sweep)"
        masked = f"  overestimates: {a.beaten_by} is stronger" if a.beaten_by else ""
        ran = "" if a.attacked is None else f"{a.attacked:>8}"
        lines.append(f"{a.name:<28}{a.target:<12}{a.accuracy:>9.4f}{ran}{mark}{masked}")
    lines.append(f"{'worst case over attacks':<40}{report.robust_acc_worst:>9.4f}   (all {n} examples)")
    lines.append("gradient-masking checks:")
    for c in report.checks:
        lines.append(f"  {c.verdict.upper():<4}  {c.name} [{c.scope}]: {c.explanation}")
    reasons = report.flags(WORST)
    if reasons:
        lines.append(f"FLAGGED: the worst case itself is not credible ({'; '.join(reasons)}); "
                     "see docs/masking_checks.md")
    elif any(c.failed for c in report.checks):
        lines.append("the worst case stands; metrics of attacks on P' alone are flagged (scope 'final')")
    if report.features is not None:
        ft = report.features
        lines.append("features (mean): alignment cos {:.3f} L2 {:.3f}; exclusion cos {:.3f} L2 {:.3f}".format(
            ft["pp_cos"]["mean"], ft["pp_l2"]["mean"], ft["np_cos"]["mean"], ft["np_l2"]["mean"]))
    return "\n".join(lines)
