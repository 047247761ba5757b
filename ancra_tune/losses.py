"""Base adversarial-training losses and ANCRA's plug-ins, as functions of logits.

Every function is vectorised over the batch and takes its hyperparameters keyword-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import ModelOutput


def anc_loss(logits_nat: Tensor, logits_neg: Tensor, *, alpha: float, weight: Tensor | None = None) -> Tensor:
    """Asymmetric negative contrast, eq. 3, as the batch mean.

    ``L = 1[h = h^o] * (alpha * sqrt(sg(p_h) * p^o_h) + (1 - alpha) * sqrt(p_h * sg(p^o_h)))``
    where h = argmax p (the natural example's prediction), p_h and p^o_h are the
    probabilities of class h under x and its negative x^o, and sg stops the gradient.
    alpha = 1 freezes the natural example and pushes only the negative away.
    ``weight`` (N,) optionally zeroes rows without a valid negative; the mean stays over N.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    p = F.softmax(logits_nat, dim=1)  # (N, K)
    p_o = F.softmax(logits_neg, dim=1)
    h = p.argmax(dim=1, keepdim=True)  # (N, 1)
    same = (h.squeeze(1) == p_o.argmax(dim=1)).to(p.dtype)  # the indicator 1[h = h^o]
    p_h = p.gather(1, h).squeeze(1)
    p_o_h = p_o.gather(1, h).squeeze(1)
    push_neg = torch.sqrt(p_h.detach() * p_o_h)  # moves only x^o
    push_nat = torch.sqrt(p_h * p_o_h.detach())  # moves only x
    per_ex = same * (alpha * push_neg + (1.0 - alpha) * push_nat)
    if weight is not None:
        per_ex = per_ex * weight
    return per_ex.mean()


def pgd_at_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float | None = None) -> Tensor:
    """PGD-AT (Madry et al.): CE on the adversarial example."""
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float | None = 6.0) -> Tensor:
    """TRADES (Zhang et al.): ``CE(f(x), y) + beta * KL(P(x) || P(x^a))``, KL summed over
    classes and averaged over the batch, gradients through both sides as in the reference."""
    assert beta is not None
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_nat, y) + beta * kl


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float | None = 5.0) -> Tensor:
    """MART (Wang et al., ICLR 2020): boosted CE on x^a plus the KL(P(x) || P(x^a)) of each
    example weighted by (1 - p_y(x)), i.e. more weight on misclassified examples."""
    assert beta is not None
    adv_probs = F.softmax(logits_adv, dim=1)  # (N, K)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    # The most likely wrong class under x^a.
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = (nat_probs * (torch.log(nat_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    return boosted_ce + beta * (kl * (1.0000001 - true_probs)).mean()


BaseLoss = Callable[..., Tensor]
BASE_LOSS_REGISTRY: dict[str, BaseLoss] = {"pgd_at": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}


def get_base_loss(name: str) -> BaseLoss:
    try:
        return BASE_LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown base loss {name!r}; known: {', '.join(BASE_LOSS_REGISTRY)}") from None


@dataclass(frozen=True)
class LossParts:
    """The total loss and its parts (each a scalar tensor; the parts are detached)."""

    total: Tensor
    at: Tensor  # base AT loss on the final output P'
    anc: Tensor  # eq. 3 on P' (0 without ANC)
    aux_at: Tensor  # base AT loss on the RA blocks' auxiliary outputs, reduced over blocks
    aux_anc: Tensor  # eq. 3 on the auxiliary outputs, reduced over blocks

    def as_floats(self) -> dict[str, float]:
        """One host sync for all parts."""
        vals = torch.stack([self.total.detach(), self.at, self.anc, self.aux_at, self.aux_anc]).tolist()
        return dict(zip(("loss", "loss_at", "loss_anc", "loss_aux_at", "loss_aux_anc"), vals, strict=True))


def ancra_loss(
    out_nat: ModelOutput,
    out_adv: ModelOutput,
    out_neg: ModelOutput | None,
    y: Tensor,
    *,
    base_loss: str,
    beta: float | None,
    alpha: float,
    zeta: float,
    gamma: float,
    anc_on_aux: bool = True,
    aux_reduction: str = "mean",
    anc_weight: Tensor | None = None,
) -> LossParts:
    """Eq. 4 on the final output plus gamma times the same loss on each RA block's auxiliary
    output (Algorithm 1): ``L = L_AT(P') + zeta L_ANC(P') + gamma * red_b [L_AT(P_b) + zeta L_ANC(P_b)]``.

    ``out_neg`` None switches ANC off. Without RA (no auxiliary outputs) the gamma term is 0.
    """
    fn = get_base_loss(base_loss)
    zero = out_nat.logits.new_zeros(())
    at = fn(out_nat.logits, out_adv.logits, y, beta=beta)
    anc = anc_loss(out_nat.logits, out_neg.logits, alpha=alpha, weight=anc_weight) if out_neg is not None else zero
    total = at + zeta * anc

    aux_at, aux_anc = zero, zero
    n_aux = len(out_nat.aux_logits)
    if n_aux:
        at_b = torch.stack([fn(pn, pa, y, beta=beta) for pn, pa in zip(out_nat.aux_logits, out_adv.aux_logits,
                                                                           strict=True)])
        if out_neg is not None and anc_on_aux:
            anc_b = torch.stack([anc_loss(pn, po, alpha=alpha, weight=anc_weight)
                                 for pn, po in zip(out_nat.aux_logits, out_neg.aux_logits, strict=True)])
        else:
            anc_b = torch.zeros_like(at_b)
        reduce = torch.mean if aux_reduction == "mean" else torch.sum
        aux_at, aux_anc = reduce(at_b), reduce(anc_b)
        total = total + gamma * (aux_at + zeta * aux_anc)
    return LossParts(total=total, at=at.detach(), anc=anc.detach(), aux_at=aux_at.detach(),
                     aux_anc=aux_anc.detach())
