"""Honest robustness evaluation: the paper's attacks, AutoAttack, adaptive attacks on RA,
gradient-masking checks, and feature analysis.

Every robust number names what it attacked:

  final      CE on the final output P' (what the paper's Table II attacks)
  aux        CE on the last RA block's auxiliary output P
  sum        CE on P' plus CE on every auxiliary P (the paper's "adaptive" total loss)
  labelgate  CE on P' with the RA gate fixed to the true label (the training-time gate)
  bpda       CE on P' with the argmax gate's backward replaced by softmax(P / T) @ W

and every accuracy is that of the model's real prediction (P', gated by its own argmax) on
the attack's examples. The *worst case* counts the examples that survive every attack at
the evaluation budget. The checks follow Carlini et al. (2019) and Athalye et al. (2018);
``docs/masking_checks.md`` explains each one.

Randomness is drawn per batch from (seed, batch index, attack index), so sharding whole
batches over workers gives exactly the single-process result.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import fgsm, pgd
from .evaluate import SoftGate
from .models import ModelOutput, RANet
from .negatives import select_negatives

log = logging.getLogger(__name__)

TARGETS = ("final", "aux", "sum", "labelgate", "bpda")
ADAPTIVE_TARGETS = ("aux", "sum", "labelgate", "bpda")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SuiteConfig:
    """What the evaluation runs. ``quick`` is for sweeps; ``full`` for final numbers."""

    preset: str = "full"
    n_examples: int | None = None  # None: the whole split
    eps: float = 8 / 255
    step_size: float | None = None  # None: eps / 4 (0.0078 at 8/255, the paper's 0.007 scale)
    pgd_steps: int = 40  # PGD-k; the doubling check also runs PGD-2k
    cw_steps: int = 40
    mim_steps: int = 40
    mim_momentum: float = 1.0
    adaptive: bool = True  # aux / sum / labelgate / bpda attacks on RA models
    adaptive_steps: int = 40
    bpda_temperature: float = 1.0
    sweep_eps: tuple[float, ...] | None = None  # None: eps, 2 eps, 8 eps, 1.0
    sweep_steps: int = 20
    square_queries: int = 1000  # 0 disables the separate Square run
    autoattack: str | None = "standard"  # "standard", a comma list of AutoAttack attacks, or None
    transfer_steps: int = 100  # PGD-T and MIM-T on the source model, when one is given
    batch_size: int = 250
    seed: int = 0
    tol: float = 0.02  # accuracy slack of the checks (sampling noise on a few hundred examples)
    features: bool = True
    embedding_max: int = 1000

    def __post_init__(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps = {self.eps} is invalid: must be > 0")
        for name in ("pgd_steps", "cw_steps", "mim_steps", "adaptive_steps", "sweep_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: must be >= 1")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples = {self.n_examples} is invalid: must be >= 1 or None")

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> SuiteConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown evaluation preset {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 4

    @property
    def sweep(self) -> tuple[float, ...]:
        if self.sweep_eps is not None:
            return tuple(self.sweep_eps)
        return tuple(sorted({min(1.0, self.eps * m) for m in (1, 2, 8)} | {1.0}))


PRESETS: dict[str, SuiteConfig] = {
    "full": SuiteConfig(),
    "quick": SuiteConfig(preset="quick", n_examples=500, pgd_steps=10, cw_steps=10, mim_steps=10, adaptive_steps=10,
                         sweep_steps=10, square_queries=200, autoattack="apgd-ce,apgd-t", transfer_steps=20,
                         embedding_max=300),
}


# --------------------------------------------------------------------------- attack plan


class LogitsOnly(nn.Module):
    """P' as a plain logits function (AutoAttack, Square)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def _sum_loss(out: ModelOutput, y: Tensor) -> Tensor:
    loss = F.cross_entropy(out.logits, y, reduction="none")
    for aux in out.aux_logits:
        loss = loss + F.cross_entropy(aux, y, reduction="none")
    return loss


@dataclass(frozen=True)
class AttackSpec:
    name: str
    kind: str  # fgsm, pgd, cw, mim, square, autoattack, transfer_pgd, transfer_mim, sweep
    target: str  # final / aux / sum / labelgate / bpda / black-box / source
    steps: int
    eps: float
    in_worst_case: bool = True  # attacks at the evaluation budget; the eps sweep is not


def plan_attacks(cfg: SuiteConfig, *, ra: bool, has_source: bool) -> list[AttackSpec]:
    e, k = cfg.eps, cfg.pgd_steps
    plan = [AttackSpec("fgsm_final", "fgsm", "final", 1, e),
            AttackSpec(f"pgd{k}_final", "pgd", "final", k, e),
            AttackSpec(f"pgd{2 * k}_final", "pgd", "final", 2 * k, e),
            AttackSpec(f"cw{cfg.cw_steps}_final", "cw", "final", cfg.cw_steps, e),
            AttackSpec(f"mim{cfg.mim_steps}_final", "mim", "final", cfg.mim_steps, e)]
    if ra and cfg.adaptive:
        plan += [AttackSpec(f"pgd{cfg.adaptive_steps}_{t}", "pgd", t, cfg.adaptive_steps, e) for t in ADAPTIVE_TARGETS]
    if cfg.square_queries > 0:
        plan.append(AttackSpec(f"square{cfg.square_queries}", "square", "black-box", cfg.square_queries, e))
    if has_source:
        t = cfg.transfer_steps
        plan += [AttackSpec(f"transfer_pgd{t}", "transfer_pgd", "source", t, e),
                 AttackSpec(f"transfer_mim{t}", "transfer_mim", "source", t, e)]
    if cfg.autoattack:
        name = "autoattack_" + cfg.autoattack.replace(",", "+")
        plan.append(AttackSpec(name, "autoattack", "final", 0, e))
    plan += [AttackSpec(f"sweep_pgd{cfg.sweep_steps}_eps{s:.4g}", "sweep", "final", cfg.sweep_steps, s,
                        in_worst_case=False) for s in cfg.sweep]
    return plan


def _generator(seed: int, batch_idx: int, attack_idx: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_idx * 7_919 + attack_idx * 104_729) % 2**63)


class _AutoAttackFlags(logging.Handler):
    """Collects the warnings AutoAttack's own checks emit (zero gradients, Square, randomness)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_attack(spec: AttackSpec, attack_idx: int, model: RANet, x: Tensor, y: Tensor, *, cfg: SuiteConfig,
               batch_idx: int, source: nn.Module | None = None, flags: list[str] | None = None) -> Tensor:
    """AEs of one batch under ``spec``; deterministic in (cfg.seed, batch_idx, attack_idx)."""
    gen = _generator(cfg.seed, batch_idx, attack_idx)
    step = cfg.step if spec.eps == cfg.eps else spec.eps / 4
    common = dict(eps=spec.eps, step_size=step, steps=spec.steps, bn="eval", init="uniform", generator=gen)
    if spec.kind == "fgsm":
        return fgsm(model, x, y, eps=spec.eps)
    if spec.kind in ("pgd", "sweep"):
        if spec.target == "final":
            return pgd(model, x, y, **common)
        if spec.target == "aux":
            return pgd(model, x, y, head=lambda o: o.aux_logits[-1], **common)
        if spec.target == "sum":
            return pgd(model, x, y, loss_fn=_sum_loss, **common)
        if spec.target == "labelgate":
            return pgd(model, x, y, gate_labels=y, **common)
        if spec.target == "bpda":
            return pgd(SoftGate(model, cfg.bpda_temperature), x, y, **common)
        raise ValueError(f"unknown attack target {spec.target!r}; known: {', '.join(TARGETS)}")
    if spec.kind == "cw":
        return pgd(model, x, y, objective="cw", **common)
    if spec.kind == "mim":
        return pgd(model, x, y, momentum=cfg.mim_momentum, **{**common, "init": "none"})
    if spec.kind in ("transfer_pgd", "transfer_mim"):
        assert source is not None
        mom = cfg.mim_momentum if spec.kind == "transfer_mim" else 0.0
        return pgd(source, x, y, momentum=mom, **{**common, "init": "none" if mom else "uniform"})
    if spec.kind == "square":
        from pyautoattack.square import SquareAttack

        sq = SquareAttack(LogitsOnly(model), p_init=0.8, n_queries=spec.steps, eps=spec.eps, norm="Linf",
                          n_restarts=1, seed=cfg.seed + batch_idx, verbose=False, device=x.device,
                          resc_schedule=False)
        with torch.no_grad():
            return sq.perturb(x, y)
    if spec.kind == "autoattack":
        return _autoattack(model, x, y, cfg=cfg, batch_idx=batch_idx, flags=flags)
    raise ValueError(f"unknown attack kind {spec.kind!r}")


def _autoattack(model: RANet, x: Tensor, y: Tensor, *, cfg: SuiteConfig, batch_idx: int,
                flags: list[str] | None) -> Tensor:
    from pyautoattack import AutoAttack

    assert cfg.autoattack is not None
    n_classes = model.fc.out_features
    if cfg.autoattack == "standard":
        aa = AutoAttack(LogitsOnly(model), norm="Linf", eps=cfg.eps, version="standard", device=x.device,
                        seed=cfg.seed + batch_idx)
    else:
        attacks = [a.strip() for a in cfg.autoattack.split(",") if a.strip()]
        aa = AutoAttack(LogitsOnly(model), norm="Linf", eps=cfg.eps, version="custom", attacks=attacks,
                        device=x.device, seed=cfg.seed + batch_idx)
        aa.apgd.n_restarts = 1  # as in the standard version
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
    aa.verbose = False
    handler = _AutoAttackFlags()
    aa.logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    finally:
        aa.logger.removeHandler(handler)
    if flags is not None:
        flags += handler.messages + [str(w.message) for w in caught if "pyautoattack" in (w.filename or "")]
    return x_adv.detach()


# --------------------------------------------------------------------------- running


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).logits.argmax(1)


def zero_gradient_mask(model: RANet, x: Tensor, y: Tensor) -> Tensor:
    """(N,) True where d CE(P'(x), y) / dx is exactly zero (no signal for a gradient attack)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).logits, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.flatten(1).abs().sum(1) == 0


@dataclass
class BatchResult:
    """Per-example outcomes of one batch: correctness per attack, zero-gradient flags, features."""

    batch_idx: int
    clean: Tensor
    correct: dict[str, Tensor]
    zero_grad: Tensor
    feat_nat: Tensor | None = None
    feat_adv: Tensor | None = None
    labels: Tensor | None = None
    flags: list[str] = field(default_factory=list)


def run_batch(model: RANet, x: Tensor, y: Tensor, plan: Sequence[AttackSpec], *, cfg: SuiteConfig, batch_idx: int,
              source: nn.Module | None = None, on_attack: Callable[[str], None] | None = None) -> BatchResult:
    model.eval()
    res = BatchResult(batch_idx=batch_idx, clean=(_predict(model, x) == y).cpu(), correct={},
                      zero_grad=zero_gradient_mask(model, x, y).cpu(), labels=y.cpu())
    feature_source = f"pgd{cfg.pgd_steps}_final"
    for i, spec in enumerate(plan):
        x_adv = run_attack(spec, i, model, x, y, cfg=cfg, batch_idx=batch_idx, source=source, flags=res.flags)
        assert (x_adv - x).abs().max() <= spec.eps + 1e-5, f"{spec.name} left the eps-ball"
        res.correct[spec.name] = (_predict(model, x_adv) == y).cpu()
        if cfg.features and spec.name == feature_source:
            with torch.no_grad():
                res.feat_nat = model(x).features.float().cpu()
                res.feat_adv = model(x_adv).features.float().cpu()
        if on_attack is not None:
            on_attack(spec.name)
    return res


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def evaluate_model(model: RANet, x: Tensor, y: Tensor, cfg: SuiteConfig, *, source: nn.Module | None = None,
                   progress: bool = True, batches: Sequence[int] | None = None) -> list[BatchResult]:
    """Run the suite on (x, y) (all examples, or only the listed batch indices); per-batch results."""
    plan = plan_attacks(cfg, ra=model.ra, has_source=source is not None)
    slices = batch_slices(x.shape[0], cfg.batch_size)
    todo = list(range(len(slices))) if batches is None else list(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * len(plan), desc="attacks", dynamic_ncols=True)
    device = next(model.parameters()).device
    out = []
    try:
        for b in todo:
            xb, yb = x[slices[b]].to(device), y[slices[b]].to(device)

            def tick(name: str) -> None:
                if bar is not None:
                    bar.set_postfix_str(name)
                    bar.update(1)

            out.append(run_batch(model, xb, yb, plan, cfg=cfg, batch_idx=b, source=source, on_attack=tick))
    finally:
        if bar is not None:
            bar.close()
    return out


# --------------------------------------------------------------------------- report


def _stats(v: Tensor) -> dict[str, float]:
    v = v.double()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": v.mean().item(), "std": v.std().item() if v.numel() > 1 else 0.0,
            "p05": q[0], "median": q[1], "p95": q[2]}


def feature_pairs(feat_nat: Tensor, feat_adv: Tensor, labels: Tensor, seed: int) -> dict[str, Tensor]:
    """Cosine similarity and L2 distance of positive pairs (x, x^a: Alignment) and negative pairs
    (x and a random example of another class: Exclusion). Each (N,)."""
    sel = select_negatives(labels, strategy="random", generator=torch.Generator().manual_seed(seed))
    neg = feat_nat[sel.index]
    ok = sel.valid
    return {"pp_cos": F.cosine_similarity(feat_nat, feat_adv, dim=1),
            "pp_l2": (feat_nat - feat_adv).norm(dim=1),
            "np_cos": F.cosine_similarity(feat_nat, neg, dim=1)[ok],
            "np_l2": (feat_nat - neg).norm(dim=1)[ok]}


def _check(name: str, passed: bool | None, explanation: str, **numbers: Any) -> dict[str, Any]:
    return {"name": name, "passed": passed, "explanation": explanation, "numbers": numbers,
            "doc": f"docs/masking_checks.md#{name.replace('_', '-')}"}


def masking_checks(acc: dict[str, float], clean: float, plan: Sequence[AttackSpec], cfg: SuiteConfig, *,
                   zero_grad_share: float, n_classes: int, ra: bool) -> list[dict[str, Any]]:
    tol, k = cfg.tol, cfg.pgd_steps
    main = [s for s in plan if s.in_worst_case]
    white = [s.name for s in main if s.kind in ("fgsm", "pgd", "cw", "mim", "autoattack")]
    checks = []
    over = {s.name: acc[s.name] for s in main if acc[s.name] > clean + tol}
    checks.append(_check(
        "robust_le_clean", not over,
        "No attack may leave more examples correct than no attack: robust accuracy above clean "
        "accuracy means the attacks are not working (e.g. masked gradients).", clean=clean, above_clean=over))
    a1, a2 = acc[f"pgd{k}_final"], acc[f"pgd{2 * k}_final"]
    checks.append(_check(
        "more_steps_not_weaker", a2 <= a1 + tol,
        f"PGD-{2 * k} must be at least as strong as PGD-{k}; if not, the loss surface is not being "
        "followed (masked or noisy gradients).", **{f"pgd{k}": a1, f"pgd{2 * k}": a2}))
    sweep = [(s.eps, acc[s.name]) for s in plan if s.kind == "sweep"]
    monotone = all(b <= a + tol for (_, a), (_, b) in zip(sweep, sweep[1:], strict=False))
    chance = 1.0 / n_classes
    at_max = sweep[-1][1]
    checks.append(_check(
        "eps_to_chance", monotone and at_max <= chance + tol,
        "Accuracy must fall as eps grows and reach chance (or below) when eps allows any image "
        "(eps = 1): a gradient attack that cannot do that is being blocked.",
        accuracy_by_eps={f"{e:.4g}": a for e, a in sweep}, chance=chance, monotone=monotone))
    best_white = min(acc[n] for n in white)
    square = [s.name for s in main if s.kind == "square"]
    checks.append(_check(
        "whitebox_beats_square", (best_white <= acc[square[0]] + tol) if square else None,
        "A gradient-free black-box attack (Square) must not beat the best white-box attack; "
        "if it does, the gradients mislead.", best_whitebox=best_white,
        square=acc[square[0]] if square else None))
    transfer = [s.name for s in main if s.kind.startswith("transfer")]
    best_transfer = min(acc[n] for n in transfer) if transfer else None
    checks.append(_check(
        "whitebox_beats_transfer", (best_white <= best_transfer + tol) if transfer else None,
        "AEs transferred from another model must not beat white-box attacks on this one.",
        best_whitebox=best_white, best_transfer=best_transfer))
    checks.append(_check(
        "no_zero_gradients", zero_grad_share <= 0.01,
        "Examples whose input gradient is exactly zero give a gradient attack nothing to follow.",
        share_zero_gradient=zero_grad_share))
    if ra:
        adaptive = {s.name: acc[s.name] for s in main if s.target in ADAPTIVE_TARGETS}
        best_adaptive = min(adaptive.values()) if adaptive else None
        checks.append(_check(
            "final_output_not_masked",
            (acc[f"pgd{k}_final"] <= best_adaptive + tol) if adaptive else None,
            "PGD on the final output P' must be as strong as adaptive attacks on the RA gate (aux P, "
            "P + P', label gate, BPDA); if they do better, numbers from attacking P' alone are masked.",
            pgd_final=acc[f"pgd{k}_final"], adaptive=adaptive))
    return checks


def build_report(results: Sequence[BatchResult], cfg: SuiteConfig, *, ra: bool, n_classes: int,
                 has_source: bool, out_dir: Path | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge per-batch results (in batch order) into the report; write PNGs to ``out_dir``."""
    results = sorted(results, key=lambda r: r.batch_idx)
    plan = plan_attacks(cfg, ra=ra, has_source=has_source)
    clean = torch.cat([r.clean for r in results])
    correct = {s.name: torch.cat([r.correct[s.name] for r in results]) for s in plan}
    zero = torch.cat([r.zero_grad for r in results])
    n = clean.numel()
    worst = clean.clone()
    for s in plan:
        if s.in_worst_case:
            worst &= correct[s.name]
    acc = {k: v.float().mean().item() for k, v in correct.items()}
    clean_acc, worst_acc = clean.float().mean().item(), worst.float().mean().item()
    checks = masking_checks(acc, clean_acc, plan, cfg, zero_grad_share=zero.float().mean().item(),
                            n_classes=n_classes, ra=ra)
    # A metric overestimates robustness ("masked" for model selection) when another single attack
    # of this report beats it by more than the tolerance.
    main = [s.name for s in plan if s.in_worst_case]
    beaten_by = {}
    for name in main:
        rival = min((m for m in main if m != name), key=lambda m: acc[m], default=None)
        if rival is not None and acc[name] > acc[rival] + cfg.tol:
            beaten_by[name] = rival
    masked = sorted(beaten_by)
    aa = [s.name for s in plan if s.kind == "autoattack"]
    flags = sorted({f for r in results for f in r.flags})
    report: dict[str, Any] = {
        **(meta or {}),
        "n_examples": n, "eps": cfg.eps, "preset": cfg.preset, "ra": ra, "suite": _jsonable(asdict(cfg)),
        "clean_acc": clean_acc,
        "robust_acc_worst": worst_acc,
        "autoattack_acc": acc[aa[0]] if aa else None,
        "attacks": [{"name": s.name, "kind": s.kind, "target": s.target, "steps": s.steps, "eps": s.eps,
                     "in_worst_case": s.in_worst_case, "accuracy": acc[s.name],
                     "beaten_by": beaten_by.get(s.name)} for s in plan],
        "masked_metrics": masked,
        "checks": checks,
        "checks_passed": all(c["passed"] is not False for c in checks),
        "autoattack_flags": flags,
        "per_example": {"clean": clean.tolist(), "worst": worst.tolist(),
                        **{k: v.tolist() for k, v in correct.items()}},
    }
    if cfg.features and all(r.feat_nat is not None for r in results):
        fn = torch.cat([r.feat_nat for r in results])  # type: ignore[misc]
        fa = torch.cat([r.feat_adv for r in results])  # type: ignore[misc]
        labels = torch.cat([r.labels for r in results])  # type: ignore[misc]
        pairs = feature_pairs(fn, fa, labels, cfg.seed)
        report["features"] = {k: _stats(v) for k, v in pairs.items()}
        report["features"]["adversary"] = f"pgd{cfg.pgd_steps}_final"
        if out_dir is not None:
            report["artifacts"] = plot_features(pairs, fn, fa, labels, out_dir, cfg)
    return report


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------- plots


def plot_features(pairs: dict[str, Tensor], feat_nat: Tensor, feat_adv: Tensor, labels: Tensor, out_dir: Path,
                  cfg: SuiteConfig) -> list[str]:
    """Histograms of the pair statistics (paper Fig. 6) and a 2-D embedding (Figs. 4-5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    titles = {"np_cos": "Exclusion: cosine(x, x_other)", "np_l2": "Exclusion: L2(x, x_other)",
              "pp_cos": "Alignment: cosine(x, x_adv)", "pp_l2": "Alignment: L2(x, x_adv)"}
    for ax, key in zip(axes.flat, ("np_cos", "np_l2", "pp_cos", "pp_l2"), strict=True):
        ax.hist(pairs[key].numpy(), bins=40, color="tab:blue" if key.startswith("pp") else "tab:red")
        ax.set_title(titles[key])
        ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(out_dir / "features_hist.png", dpi=110)
    plt.close(fig)

    m = min(cfg.embedding_max, feat_nat.shape[0])
    data = torch.cat([feat_nat[:m], feat_adv[:m]]).numpy()
    method = "t-SNE"
    try:
        import umap  # type: ignore[import-not-found]

        emb = umap.UMAP(random_state=cfg.seed).fit_transform(data)
        method = "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        emb = TSNE(n_components=2, random_state=cfg.seed, init="pca",
                   perplexity=float(min(30, max(2, (2 * m - 1) // 3)))).fit_transform(data)
    lab = labels[:m].numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(emb[:m, 0], emb[:m, 1], c=lab, cmap="tab10", s=12, marker="o", label="natural")
    ax.scatter(emb[m:, 0], emb[m:, 1], c=lab, cmap="tab10", s=14, marker="x", label="adversarial")
    ax.legend(loc="best")
    ax.set_title(f"{method} of features: natural (o) and PGD-{cfg.pgd_steps} adversarial (x)")
    fig.colorbar(sc, ax=ax, label="class")
    fig.tight_layout()
    fig.savefig(out_dir / "embedding.png", dpi=110)
    plt.close(fig)
    return ["features_hist.png", "embedding.png"]


def format_report(report: dict[str, Any]) -> str:
    """A readable table of accuracies and check verdicts."""
    lines = [f"clean accuracy            {report['clean_acc']:.4f}   ({report['n_examples']} examples, "
             f"eps {report['eps']:.4g})"]
    lines.append(f"{'attack':<28}{'target':<12}{'accuracy':>9}")
    for a in report["attacks"]:
        mark = "" if a["in_worst_case"] else "  (eps sweep)"
        masked = f"  overestimates: {a['beaten_by']} is stronger" if a.get("beaten_by") else ""
        lines.append(f"{a['name']:<28}{a['target']:<12}{a['accuracy']:>9.4f}{mark}{masked}")
    lines.append(f"{'worst case over attacks':<40}{report['robust_acc_worst']:>9.4f}")
    lines.append("gradient-masking checks:")
    for c in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["passed"]]
        lines.append(f"  {verdict}  {c['name']}: {c['explanation']}")
    for f in report["autoattack_flags"]:
        lines.append(f"  AutoAttack flag: {f}")
    if "features" in report:
        ft = report["features"]
        lines.append("features (mean): alignment cos {:.3f} L2 {:.3f}; exclusion cos {:.3f} L2 {:.3f}".format(
            ft["pp_cos"]["mean"], ft["pp_l2"]["mean"], ft["np_cos"]["mean"], ft["np_l2"]["mean"]))
    return "\n".join(lines)


def summary_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat numbers for Tune/MLflow: ``{prefix}clean_acc``, ``{prefix}robust_acc_worst``, each attack."""
    out = {f"{prefix}clean_acc": report["clean_acc"], f"{prefix}robust_acc_worst": report["robust_acc_worst"]}
    for a in report["attacks"]:
        out[f"{prefix}acc_{a['name']}"] = a["accuracy"]
    out[f"{prefix}checks_passed"] = float(report["checks_passed"])
    return out


def seeded_subset(n_total: int, n: int | None, seed: int) -> Tensor:
    """The first ``n`` examples of a fixed permutation: the same examples every time."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


__all__ = [
    "PRESETS", "AttackSpec", "BatchResult", "SuiteConfig", "build_report", "evaluate_model", "feature_pairs",
    "format_report", "masking_checks", "plan_attacks", "run_batch", "seeded_subset", "summary_metrics",
    "zero_gradient_mask",
]


def load_eval_data(train_cfg: Any, split: str, data_root: str | None = None) -> tuple[Tensor, Tensor]:
    """The checkpoint's validation split (as held out in training) or its test split, in [0, 1]."""
    from .data import load_dataset

    data_cfg = train_cfg.data if data_root is None else replace(train_cfg.data, root=data_root)
    splits = load_dataset(data_cfg)
    if split == "val":
        data = splits.val
    elif split == "test":
        if splits.test is None:
            raise ValueError(f"dataset {data_cfg.dataset!r} as configured has no test split (set data.test_file)")
        data = splits.test
    else:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if len(data) == 0:
        raise ValueError(f"the {split} split is empty")
    return data.images.float().div(255.0), data.labels


def evaluate_checkpoint(path: str | Path, cfg: SuiteConfig, *, split: str = "val", source: str | Path | None = None,
                        deploy_ra: bool = False, out_dir: str | Path | None = None, device: str = "cpu",
                        data_root: str | None = None, progress: bool = True,
                        evaluate: Callable[..., list[BatchResult]] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint; with ``deploy_ra`` a standard model with RA off and on, side by side.

    ``evaluate``: runs the attacks, with :func:`evaluate_model`'s signature (default: this
    process); ``trainables.distributed_eval`` passes one that shards batches over Ray workers.
    """
    import json

    from .checkpoint import load_model

    dev = torch.device(device)
    model, train_cfg, info = load_model(path, map_location=dev)
    if deploy_ra and model.ra:
        raise ValueError(f"{path} was trained with RA on; deployment RA (Fig. 7) applies to standard models")
    x, y = load_eval_data(train_cfg, split, data_root)
    idx = seeded_subset(x.shape[0], cfg.n_examples, cfg.seed)
    x, y = x[idx], y[idx]
    src = load_model(source, map_location=dev)[0] if source is not None else None
    out = Path(out_dir) if out_dir is not None else None
    meta = {"checkpoint": str(path), "split": split, "source": str(source) if source else None,
            "model": train_cfg.model.name, "dataset": train_cfg.data.dataset}
    variants = [("standard", model)]
    if deploy_ra:
        variants.append(("deployment_ra", load_model(path, ra=True, map_location=dev)[0]))
    reports = {}
    for name, m in variants:
        sub = (out / name) if (out is not None and deploy_ra) else out
        results = (evaluate or evaluate_model)(m, x, y, cfg, source=src, progress=progress)
        reports[name] = build_report(results, cfg, ra=m.ra, n_classes=info.num_classes, has_source=src is not None,
                                     out_dir=sub, meta={**meta, "variant": name})
    report = reports["standard"] if not deploy_ra else {"deployment": True, **reports}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
