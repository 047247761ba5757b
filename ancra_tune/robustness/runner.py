"""Running the suite: every attack of the plan on every batch, after the per-batch probes.

Randomness is drawn per batch from (seed, batch index, attack index), so sharding whole batches
over workers gives exactly the single-process result. A batch on which the model turns out to be
randomised is attacked with EOT versions of the gradient attacks and AutoAttack's ``rand``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import fgsm, pgd, random_start
from ..models import ModelOutput, RANet
from . import adaptive
from .checks import gradient_probe, randomness_probe, zero_gradient_mask
from .report import BatchResult
from .suite import SURROGATES, AttackKind, AttackSpec, SuiteConfig, Target, cascade_order, plan_attacks


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


@dataclass(frozen=True)
class AttackCall:
    """What one attack on one batch gets, besides the model and the batch: the spec, the suite, the
    batch's seeded generator and PGD settings, and the extras a few attacks use."""

    spec: AttackSpec
    cfg: SuiteConfig
    gen: torch.Generator
    common: dict[str, Any]  # PGD's eps, step, steps, BN mode, start, generator and EOT
    batch_idx: int
    attack_idx: int
    source: nn.Module | None
    flags: list[str] | None
    eot: int
    suspicious: bool
    positions: Tensor | None = None  # the attacked examples' places in the whole batch (the cascade)
    batch_size: int | None = None  # the whole batch's size


def _fgsm(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    if c.eot == 1:
        return fgsm(model, x, y, eps=c.spec.eps)
    return pgd(model, x, y, eps=c.spec.eps, step_size=c.spec.eps, steps=1, bn="eval", init="none", eot=c.eot)


def _pgd(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    """PGD on P' (``final``), or through a surrogate of RA's gate, every visited point scored."""
    if c.spec.target is Target.FINAL:
        return pgd(model, x, y, **c.common)
    if c.spec.target not in SURROGATES:
        raise ValueError(f"unknown attack target {c.spec.target!r}; known: final, {', '.join(SURROGATES)}")
    tracker = adaptive.Tracker(model, x, y)
    surrogate = adaptive.SurrogateModel(model, c.spec.target, y, tracker, c.cfg.gate_temperature)
    last = pgd(surrogate, x, y, loss_fn=adaptive.pgd_loss(c.spec.target), **c.common)
    tracker.observe(last, surrogate.rows)
    return tracker.result(last)


def _apgd(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    n_classes = model.fc.out_features
    if c.spec.kind is AttackKind.APGD_T and n_classes < 4:  # targeted DLR needs 4 classes
        return x.clone()
    loss = "ce" if c.spec.kind is AttackKind.APGD_CE else "dlr-targeted"
    return adaptive.apgd(model, x, y, target=c.spec.target, loss=loss,
                         eps=c.spec.eps, n_iter=c.spec.steps, n_restarts=c.cfg.apgd_restarts,
                         n_targets=min(c.cfg.apgd_targets, n_classes - 1), temperature=c.cfg.gate_temperature,
                         seed=_attack_seed(c.cfg.seed, c.batch_idx, c.attack_idx), eot_iter=c.eot, flags=c.flags,
                         positions=c.positions, batch_size=c.batch_size)


def _cw(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    return pgd(model, x, y, objective="cw", **c.common)


def _mim(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    return pgd(model, x, y, momentum=c.cfg.mim_momentum, **{**c.common, "init": "none"})


def _transfer(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    """PGD (or MIM) crafted on the source model, scored on ``model``."""
    assert c.source is not None
    mom = c.cfg.mim_momentum if c.spec.kind is AttackKind.TRANSFER_MIM else 0.0
    return pgd(c.source, x, y, momentum=mom, **{**c.common, "init": "none" if mom else "uniform", "eot": 1})


def _square(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    from pyautoattack.square import SquareAttack

    queries = max(c.spec.steps, c.cfg.square_queries_suspicious) if c.suspicious else c.spec.steps
    sq = SquareAttack(LogitsOnly(model), p_init=0.8, n_queries=queries, eps=c.spec.eps, norm="Linf",
                      n_restarts=1, seed=c.cfg.seed + c.batch_idx, verbose=False, device=x.device,
                      resc_schedule=False)
    with torch.no_grad():
        return sq.perturb(x, y)


def _autoattack_call(model: RANet, x: Tensor, y: Tensor, c: AttackCall) -> Tensor:
    return _autoattack(model, x, y, cfg=c.cfg, batch_idx=c.batch_idx, flags=c.flags, randomized=c.eot > 1)


#: every attack kind an AttackSpec may name, and the function that runs it (the registry)
ATTACKS: dict[AttackKind, Callable[[RANet, Tensor, Tensor, AttackCall], Tensor]] = {
    AttackKind.FGSM: _fgsm, AttackKind.PGD: _pgd, AttackKind.SWEEP: _pgd, AttackKind.APGD_CE: _apgd,
    AttackKind.APGD_T: _apgd, AttackKind.CW: _cw, AttackKind.MIM: _mim, AttackKind.TRANSFER_PGD: _transfer,
    AttackKind.TRANSFER_MIM: _transfer, AttackKind.SQUARE: _square, AttackKind.AUTOATTACK: _autoattack_call,
}


def run_attack(spec: AttackSpec, attack_idx: int, model: RANet, x: Tensor, y: Tensor, *, cfg: SuiteConfig,
               batch_idx: int, source: nn.Module | None = None, flags: list[str] | None = None,
               eot: int = 1, suspicious: bool = False, rows: Tensor | None = None,
               start: Tensor | None = None, start_steps: int = 0) -> Tensor:
    """AEs of one batch under ``spec``; deterministic in (cfg.seed, batch_idx, attack_idx) for a
    deterministic model. ``eot`` > 1: gradients averaged over that many samples (random models);
    ``suspicious``: the batch's gradients are broken, so Square gets its larger budget.

    ``rows``: attack only these examples of the batch (the cascade); each keeps the random start it
    has in the whole batch, so a PGD-type attack gives every example the same AE either way. Returns
    the AEs of those rows. ``start``: the whole batch's last iterate of the attack ``spec`` continues
    (``start_steps`` steps of it), so PGD-2k costs k more steps, not 2k."""
    attack = ATTACKS.get(spec.kind)
    if attack is None:
        raise ValueError(f"unknown attack kind {spec.kind!r}; known: {', '.join(ATTACKS)}")
    gen = _generator(cfg.seed, batch_idx, attack_idx)
    step = cfg.step if spec.eps == cfg.eps else spec.eps / 4
    init: Any = "uniform"
    steps = spec.steps
    if start is not None:
        init, steps = start, spec.steps - start_steps
    elif rows is not None:
        init = random_start(x, eps=spec.eps, init="uniform", generator=gen)  # the whole batch's draw
    full = x.shape[0]
    if rows is not None:
        x, y = x[rows], y[rows]
        if isinstance(init, Tensor):
            init = init[rows]
    common = dict(eps=spec.eps, step_size=step, steps=steps, bn="eval", init=init, generator=gen, eot=eot)
    return attack(model, x, y, AttackCall(spec, cfg, gen, common, batch_idx, attack_idx, source, flags, eot,
                                          suspicious, positions=rows, batch_size=full))


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
              source: nn.Module | None = None, on_attack: Callable[[str], None] | None = None,
              check: Tensor | None = None) -> BatchResult:
    """Every attack of the plan on one batch, in the cascade's order (:func:`.suite.cascade_order`):
    an attack runs on the ``check`` examples (all of them: default every example) and on those every
    attack before it left correct; the worst case is per example over all of them."""
    model.eval()
    n = y.shape[0]
    check = torch.ones(n, dtype=torch.bool) if check is None else check.cpu()
    randomized = randomness_probe(model, x, y)
    eot = cfg.eot_samples if randomized else 1
    clean = (_predict(model, x) == y).cpu()
    res = BatchResult(batch_idx=batch_idx, clean=clean, correct={}, zero_grad=zero_gradient_mask(model, x, y).cpu(),
                      labels=y.cpu(), randomized=randomized, check=check,
                      probe=gradient_probe(model, x, y, examples=cfg.grad_check_examples,
                                           directions=cfg.grad_check_directions, seed=cfg.seed + batch_idx))
    res.suspicious = randomized or res.zero_grad.float().mean().item() > 0.01 or (
        res.probe is not None and not res.probe.sane)
    feature_source = f"pgd{cfg.pgd_steps}_final"
    continued = {s.continues for s in plan if s.continues}
    alive = clean.clone()
    iterates: dict[str, Tensor] = {}
    steps = {s.name: s.steps for s in plan}
    for i in cascade_order(list(plan)):
        spec = plan[i]
        sel = (check | alive) if spec.in_worst_case else check.clone()
        rows = sel.nonzero().squeeze(1)
        ok = torch.zeros(n, dtype=torch.bool)
        if rows.numel():
            start = iterates.get(spec.continues) if spec.continues else None
            x_rows = run_attack(spec, i, model, x, y, cfg=cfg, batch_idx=batch_idx, source=source, flags=res.flags,
                                eot=eot, suspicious=res.suspicious, rows=rows.to(x.device), start=start,
                                start_steps=steps.get(spec.continues or "", 0))
            assert (x_rows - x[rows.to(x.device)]).abs().max() <= spec.eps + 1e-5, f"{spec.name} left the eps-ball"
            ok[rows] = (_predict(model, x_rows) == y[rows.to(x.device)]).cpu()
            if spec.name in continued:
                full = x.clone()
                full[rows.to(x.device)] = x_rows
                iterates[spec.name] = full
            if cfg.features and spec.name == feature_source:
                on = check[rows]  # the features of the check examples (every attack ran on them)
                with torch.no_grad():
                    res.feat_nat = model(x[rows.to(x.device)][on.to(x.device)]).features.float().cpu()
                    res.feat_adv = model(x_rows[on.to(x.device)]).features.float().cpu()
        if spec.in_worst_case:
            alive &= ok | ~sel  # an example not attacked was already broken (alive is False there)
        res.correct[spec.name] = ok[check]
        res.attacked[spec.name] = int(rows.numel())
        if on_attack is not None:
            on_attack(spec.name)
    res.worst = alive
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

            idx = torch.arange(slices[b].start, slices[b].stop)
            check = idx < cfg.check_examples if cfg.check_examples is not None else None
            out.append(run_batch(model, xb, yb, plan, cfg=cfg, batch_idx=b, source=source, on_attack=tick,
                                 check=check))
    finally:
        if bar is not None:
            bar.close()
    return out
