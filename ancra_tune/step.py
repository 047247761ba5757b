"""One ANCRA training step (Algorithm 1): negatives (Table I) and their targeted OEs (eq. 5), the
adversarial examples, RA's label gate (eq. 6) and the loss L_AT + zeta L_ANC + gamma aux (eqs. 3-4),
with every released detail an explicit option (see the README's table)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import bn_mode, pgd
from .config import MethodConfig, TrainConfig
from .losses import ancra_loss
from .models import ModelOutput, unwrap
from .negatives import select_negatives


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _split(out: ModelOutput, n: int) -> Iterator[ModelOutput]:
    """Cut a joint forward over [x; x^a; x^o] back into per-part outputs of n rows."""
    logits = out.logits.split(n)
    aux = [a.split(n) for a in out.aux_logits]
    feats = out.features.split(n)
    for i in range(len(logits)):
        yield ModelOutput(logits=logits[i], aux_logits=tuple(a[i] for a in aux), features=feats[i])


def attack_loss(*, aux_weight: float, kl_ref: tuple[Tensor, ...] | None = None,
                targeted: Tensor | None = None) -> Callable[[ModelOutput, Tensor], Tensor]:
    """The training attack's per-row objective, as released (``u_pgd`` / ``t_pgd``):
    ``CE(P', t) + aux_weight * mean_b CE(P_b, t)`` over the RA blocks' auxiliary outputs P_b
    (just CE(P', t) without RA or with ``aux_weight`` 0). With ``kl_ref`` (the natural example's
    probabilities of P' and of each P_b) the untargeted rows use the vanilla-TRADES objective
    ``KL(P'(x) || P'(x')) + aux_weight * mean_b KL(P_b(x) || P_b(x'))`` (the released ``u_trades``);
    ``targeted`` (N,) marks rows that keep the CE objective (OEs in a batched attack)."""

    def ce(out: ModelOutput, t: Tensor) -> Tensor:
        loss = F.cross_entropy(out.logits, t, reduction="none")  # (N,)
        if out.aux_logits and aux_weight:
            aux = torch.stack([F.cross_entropy(p, t, reduction="none") for p in out.aux_logits])
            loss = loss + aux_weight * aux.mean(0)
        return loss

    def kl(out: ModelOutput) -> Tensor:
        assert kl_ref is not None
        heads = (out.logits, *out.aux_logits)

        def one(ref: Tensor, logits: Tensor) -> Tensor:
            return (ref * (torch.log(ref + 1e-12) - F.log_softmax(logits.float(), 1))).sum(1)

        loss = one(kl_ref[0], heads[0])
        if len(heads) > 1 and aux_weight:
            loss = loss + aux_weight * torch.stack([one(r, h) for r, h in zip(kl_ref[1:], heads[1:],
                                                                             strict=True)]).mean(0)
        return loss

    def fn(out: ModelOutput, t: Tensor) -> Tensor:
        if kl_ref is None:
            return ce(out, t)
        if targeted is None:
            return kl(out)
        return torch.where(targeted, ce(out, t), kl(out))

    return fn


def ancra_step(model: nn.Module, x: Tensor, y: Tensor, *, cfg: TrainConfig, epoch: int,
               generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Craft OEs (negatives, targeted toward y: eq. 5) and AEs (untargeted) and return the
    ANCRA loss of the batch and its detached parts. The caller backpropagates.

    The defaults follow the released ``trades_train``: the negatives are picked, the OE attack
    runs, then the AE attack, each with BatchNorm in eval mode and RA gated by the prediction;
    the loss runs x, x^a and x^o through three train-mode forwards gated by their own labels.
    ``model`` may be DDP-wrapped: it computes the loss; the attack runs on the bare module.
    x: (N, C, H, W) in [0, 1]; y: (N,).
    """
    m, a = cfg.method, cfg.attack
    core = unwrap(model)
    n = x.shape[0]
    metrics: dict[str, Tensor] = {}
    amp = _autocast(cfg, x.device)

    # 1. Negatives (OEs): a partner of another label for every anchor.
    x_neg = y_neg = anc_weight = None
    if m.anc:
        strategy = m.negatives if epoch >= m.negatives_warmup_epochs else "random"
        logits = None
        if strategy != "random":  # soft/hard/easy need the batch's predictions (eval mode, as released)
            with torch.no_grad(), bn_mode(core, a.bn_mode), amp:
                logits = core(x).logits.float()
        sel = select_negatives(y, strategy=strategy, logits=logits, random_draw=m.random_draw,
                               pick=m.criterion_pick, generator=generator)
        x_neg, y_neg = x[sel.index], y[sel.index]
        anc_weight = sel.valid.to(x.dtype)
        metrics["neg_fallback_rate"] = sel.fallback_rate

    # 2. The attacks: OEs (targeted toward the anchor's label y), then AEs; or both in one batch.
    w = (a.aux_weight if a.aux_weight is not None else m.gamma) if a.objective == "final_and_aux" else 0.0
    kl_ref = None
    if m.base_loss == "trades" and m.trades_attack_loss == "kl":  # vanilla TRADES: KL to P(x), fixed
        with torch.no_grad(), bn_mode(core, a.bn_mode), amp:
            ref = core(x)
        kl_ref = tuple(F.softmax(h.float(), 1) for h in (ref.logits, *ref.aux_logits))
    kw = dict(eps=a.eps, step_size=a.step_size, steps=a.steps, bn=a.bn_mode, init=a.init, init_std=a.init_std,
              generator=generator)
    label_gate = a.ra_gate == "label"
    with amp:
        if x_neg is not None and m.targeted and a.schedule == "batched":
            assert y_neg is not None
            mask = torch.arange(2 * n, device=x.device) >= n  # rows n.. are OEs, targeted toward y
            ref2 = tuple(torch.cat([r, r]) for r in kl_ref) if kl_ref is not None else None
            adv = pgd(core, torch.cat([x, x_neg]), torch.cat([y, y]), targeted=mask,
                      loss_fn=attack_loss(aux_weight=w, kl_ref=ref2, targeted=mask),
                      gate_labels=torch.cat([y, y_neg]) if label_gate else None, **kw)
            x_adv, x_neg = adv[:n], adv[n:]
        else:
            if x_neg is not None and m.targeted:
                assert y_neg is not None
                x_neg = pgd(core, x_neg, y, targeted=True, loss_fn=attack_loss(aux_weight=w),
                            gate_labels=y_neg if label_gate else None, **kw)
            x_adv = pgd(core, x, y, loss_fn=attack_loss(aux_weight=w, kl_ref=kl_ref),
                        gate_labels=y if label_gate else None, **kw)

    # 3. The loss, in train mode; each example gated by its own label (x^o optionally by y).
    model.train()
    need_nat = m.base_loss != "pgd_at" or x_neg is not None
    parts, gates = [x_adv], [y]
    if need_nat:
        parts.insert(0, x), gates.insert(0, y)
    if x_neg is not None:
        assert y_neg is not None
        parts.append(x_neg), gates.append(y_neg if m.negative_gate == "own_label" else y)
    with amp:
        if m.joint_forward:
            outs = list(_split(model(torch.cat(parts), torch.cat(gates)), n))
        else:  # released: one train-mode forward (one BatchNorm batch) per part
            outs = [model(p, g) for p, g in zip(parts, gates, strict=True)]
    # PGD-AT without ANC never reads the natural output: outs[0] is then x^a itself.
    out_nat, out_adv = outs[0], outs[1] if need_nat else outs[0]
    out_neg = outs[2] if x_neg is not None else None
    lp = ancra_loss(out_nat, out_adv, out_neg, y, base_loss=m.base_loss, beta=m.effective_beta, alpha=m.alpha,
                    zeta=m.zeta, gamma=m.gamma if core.ra else 0.0, anc_on_aux=m.anc_on_aux,
                    aux_reduction=m.aux_reduction, anc_weight=anc_weight)
    metrics.update(loss=lp.total.detach(), loss_at=lp.at, loss_anc=lp.anc, loss_aux_at=lp.aux_at,
                   loss_aux_anc=lp.aux_anc)
    # Training accuracies as the released code logs them: the model as it predicts (eval-mode
    # BatchNorm, RA gated by its own prediction) on x, x^a, and x^o against x^o's label. P' gated
    # by the label, as in the loss, is ~1.0 by construction (the gate leaks the label): it is
    # logged too, as train_adv_acc_label_gate, to show exactly that.
    with torch.no_grad(), bn_mode(core, "eval"), amp:
        seen = [x, x_adv] + ([x_neg] if x_neg is not None else [])
        pred = core(torch.cat(seen)).logits.argmax(1).split(n)
    metrics.update(train_nat_acc=(pred[0] == y).float().mean(), train_adv_acc=(pred[1] == y).float().mean(),
                   train_adv_acc_label_gate=(out_adv.logits.detach().argmax(1) == y).float().mean())
    if x_neg is not None:
        metrics["train_neg_acc"] = (pred[2] == y_neg).float().mean()
    return lp.total, metrics


def resolved_method(m: MethodConfig) -> MethodConfig:
    """The method with beta as trained (a checkpoint may store it explicitly or as null)."""
    return dataclasses.replace(m, beta=m.effective_beta)
