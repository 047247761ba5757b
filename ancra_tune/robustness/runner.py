"""Running the suite: every attack of the plan on every batch, after the per-batch probes.

Randomness is drawn per batch from (seed, batch index, attack index), so sharding whole batches
over workers gives exactly the single-process result. A batch on which the model turns out to be
randomised is attacked with EOT versions of the gradient attacks and AutoAttack's ``rand``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..attacks import fgsm, pgd
from ..models import ModelOutput, RANet
from . import adaptive
from .checks import gradient_probe, randomness_probe, zero_gradient_mask
from .report import BatchResult
from .suite import SURROGATES, AttackSpec, SuiteConfig, plan_attacks


class LogitsOnly(nn.Module):
    """P' as a plain logits function (AutoAttack, Square, the exported model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def _generator(seed: int, batch_idx: int, attack_idx: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_idx * 7_919 + attack_idx * 104_729) % 2**63)


def _attack_seed(seed: int, batch_idx: int, attack_idx: int) -> int:
    return (seed * 1_000_003 + batch_idx * 7_919 + attack_idx * 104_729) % 2**31


class _AutoAttackFlags(logging.Handler):
    """Collects the warnings AutoAttack's own checks emit (zero gradients, Square, randomness)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_attack(spec: AttackSpec, attack_idx: int, model: RANet, x: Tensor, y: Tensor, *, cfg: SuiteConfig,
               batch_idx: int, source: nn.Module | None = None, flags: list[str] | None = None,
               eot: int = 1, suspicious: bool = False) -> Tensor:
    """AEs of one batch under ``spec``; deterministic in (cfg.seed, batch_idx, attack_idx) for a
    deterministic model. ``eot`` > 1: gradients averaged over that many samples (random models);
    ``suspicious``: the batch's gradients are broken, so Square gets its larger budget."""
    gen = _generator(cfg.seed, batch_idx, attack_idx)
    step = cfg.step if spec.eps == cfg.eps else spec.eps / 4
    common = dict(eps=spec.eps, step_size=step, steps=spec.steps, bn="eval", init="uniform", generator=gen, eot=eot)
    if spec.kind == "fgsm":
        return fgsm(model, x, y, eps=spec.eps) if eot == 1 else pgd(
            model, x, y, eps=spec.eps, step_size=spec.eps, steps=1, bn="eval", init="none", eot=eot)
    if spec.kind in ("pgd", "sweep"):
        if spec.target == "final":
            return pgd(model, x, y, **common)
        if spec.target not in SURROGATES:
            raise ValueError(f"unknown attack target {spec.target!r}")
        tracker = adaptive.Tracker(model, x, y)
        surrogate = adaptive.SurrogateModel(model, spec.target, y, tracker, cfg.gate_temperature)
        last = pgd(surrogate, x, y, loss_fn=adaptive.pgd_loss(spec.target), **common)
        tracker.observe(last, surrogate.rows)
        return tracker.result(last)
    if spec.kind in ("apgd-ce", "apgd-t"):
        n_targets = min(cfg.apgd_targets, model.fc.out_features - 1)
        if spec.kind == "apgd-t" and model.fc.out_features < 4:  # targeted DLR needs 4 classes
            return x.clone()
        return adaptive.apgd(model, x, y, target=spec.target, loss="ce" if spec.kind == "apgd-ce" else "dlr-targeted",
                             eps=spec.eps, n_iter=spec.steps, n_restarts=cfg.apgd_restarts, n_targets=n_targets,
                             temperature=cfg.gate_temperature, seed=_attack_seed(cfg.seed, batch_idx, attack_idx),
                             eot_iter=eot, flags=flags)
    if spec.kind == "cw":
        return pgd(model, x, y, objective="cw", **common)
    if spec.kind == "mim":
        return pgd(model, x, y, momentum=cfg.mim_momentum, **{**common, "init": "none"})
    if spec.kind in ("transfer_pgd", "transfer_mim"):
        assert source is not None
        mom = cfg.mim_momentum if spec.kind == "transfer_mim" else 0.0
        return pgd(source, x, y, momentum=mom, **{**common, "init": "none" if mom else "uniform", "eot": 1})
    if spec.kind == "square":
        from pyautoattack.square import SquareAttack

        queries = max(spec.steps, cfg.square_queries_suspicious) if suspicious else spec.steps
        sq = SquareAttack(LogitsOnly(model), p_init=0.8, n_queries=queries, eps=spec.eps, norm="Linf",
                          n_restarts=1, seed=cfg.seed + batch_idx, verbose=False, device=x.device,
                          resc_schedule=False)
        with torch.no_grad():
            return sq.perturb(x, y)
    if spec.kind == "autoattack":
        return _autoattack(model, x, y, cfg=cfg, batch_idx=batch_idx, flags=flags, randomized=eot > 1)
    raise ValueError(f"unknown attack kind {spec.kind!r}")


def _autoattack(model: RANet, x: Tensor, y: Tensor, *, cfg: SuiteConfig, batch_idx: int,
                flags: list[str] | None, randomized: bool) -> Tensor:
    from pyautoattack import AutoAttack

    n_classes = model.fc.out_features
    seed = cfg.seed + batch_idx
    if randomized:  # AutoAttack's version for randomised defences: APGD-CE and APGD-DLR with EOT
        aa = AutoAttack(LogitsOnly(model), norm="Linf", eps=cfg.eps, version="rand", device=x.device, seed=seed)
        aa.apgd.eot_iter = cfg.eot_samples
    elif cfg.autoattack == "standard":
        aa = AutoAttack(LogitsOnly(model), norm="Linf", eps=cfg.eps, version="standard", device=x.device, seed=seed)
    else:
        aa = AutoAttack(LogitsOnly(model), norm="Linf", eps=cfg.eps, version="custom",
                        attacks=list(cfg.autoattack_list), device=x.device, seed=seed)
        aa.apgd.n_restarts = 1  # as in the standard version
        # A custom bundle (the quick preset's) runs the suite's APGD budget: fewer iterations and targets.
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = cfg.apgd_iters
        aa.apgd_targeted.n_target_classes = cfg.apgd_targets
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


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return (out.logits if isinstance(out, ModelOutput) else out).argmax(1)


def run_batch(model: RANet, x: Tensor, y: Tensor, plan: Sequence[AttackSpec], *, cfg: SuiteConfig, batch_idx: int,
              source: nn.Module | None = None, on_attack: Callable[[str], None] | None = None) -> BatchResult:
    model.eval()
    randomized = randomness_probe(model, x, y)
    eot = cfg.eot_samples if randomized else 1
    res = BatchResult(batch_idx=batch_idx, clean=(_predict(model, x) == y).cpu(), correct={},
                      zero_grad=zero_gradient_mask(model, x, y).cpu(), labels=y.cpu(), randomized=randomized,
                      probe=gradient_probe(model, x, y, examples=cfg.grad_check_examples,
                                           directions=cfg.grad_check_directions, seed=cfg.seed + batch_idx))
    res.suspicious = randomized or res.zero_grad.float().mean().item() > 0.01 or (
        res.probe is not None and not res.probe.sane)
    feature_source = f"pgd{cfg.pgd_steps}_final"
    for i, spec in enumerate(plan):
        x_adv = run_attack(spec, i, model, x, y, cfg=cfg, batch_idx=batch_idx, source=source, flags=res.flags,
                           eot=eot, suspicious=res.suspicious)
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
