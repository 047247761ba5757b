import math

import pytest
import torch
import torch.nn.functional as F

from ancra_tune.losses import anc_loss, ancra_loss, get_base_loss, mart_loss, pgd_at_loss, trades_loss
from ancra_tune.models import ModelOutput


def test_anc_value_and_indicator_by_hand() -> None:
    # Row 0: both predict class 0 -> active. Row 1: natural predicts 1, negative predicts 0 -> inactive.
    nat = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    neg = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.8, 0.1, 0.1]]))
    for alpha in (0.0, 0.3, 1.0):
        expected = (math.sqrt(0.7 * 0.5) + 0.0) / 2  # both halves equal sqrt(p_h p_h^o) in value
        assert anc_loss(nat, neg, alpha=alpha).item() == pytest.approx(expected, rel=1e-6)
    # Indicator off everywhere -> exactly 0.
    neg_off = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    assert anc_loss(nat, neg_off, alpha=1.0).item() == 0.0
    # weight masks rows but keeps the mean over N.
    assert anc_loss(nat, neg, alpha=1.0, weight=torch.tensor([0.0, 1.0])).item() == 0.0


def _grads(alpha: float):
    nat = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    neg = torch.tensor([[1.0, 0.9, 0.0]], requires_grad=True)
    anc_loss(nat, neg, alpha=alpha).backward()
    return nat.grad, neg.grad


def test_anc_stop_gradients() -> None:
    g_nat, g_neg = _grads(1.0)  # alpha = 1: the natural example is frozen, only x^o is pushed
    assert torch.count_nonzero(g_nat) == 0 and torch.count_nonzero(g_neg) > 0
    g_nat, g_neg = _grads(0.0)  # alpha = 0: the negative is frozen
    assert torch.count_nonzero(g_neg) == 0 and torch.count_nonzero(g_nat) > 0
    # Gradient value for alpha = 1: d sqrt(p_h * q_h) / d q = sqrt(p_h) / (2 sqrt(q_h)) through softmax.
    nat = torch.tensor([[2.0, 0.5, -1.0]])
    neg = torch.tensor([[1.0, 0.9, 0.0]], requires_grad=True)
    anc_loss(nat, neg, alpha=1.0).backward()
    p, q = F.softmax(nat, 1)[0], F.softmax(neg.detach(), 1)[0]
    dq = math.sqrt(p[0]) / (2 * math.sqrt(q[0]))
    expected = dq * q[0] * (torch.eye(3)[0] - q)  # softmax Jacobian row for class h = 0
    torch.testing.assert_close(neg.grad[0], expected)
    # Lowering the negative's probability of h is the descent direction.
    assert neg.grad[0, 0] > 0


def _ref_trades(ln, la, y, beta):
    n = ln.shape[0]
    kl = sum(sum(F.softmax(ln[i], 0)[k] * (F.log_softmax(ln[i], 0)[k] - F.log_softmax(la[i], 0)[k])
                 for k in range(ln.shape[1])) for i in range(n)) / n
    return F.cross_entropy(ln, y) + beta * kl


def _ref_mart(ln, la, y, beta):
    total_ce, total_kl = 0.0, 0.0
    n = ln.shape[0]
    for i in range(n):
        pa, pn = F.softmax(la[i], 0), F.softmax(ln[i], 0)
        ranked = sorted(range(len(pa)), key=lambda k: pa[k].item())
        wrong = ranked[-2] if ranked[-1] == y[i].item() else ranked[-1]
        total_ce += -torch.log(pa[y[i]]) - torch.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pn[k] * (torch.log(pn[k] + 1e-12) - torch.log(pa[k] + 1e-12)) for k in range(len(pa)))
        total_kl += kl * (1.0000001 - pn[y[i]])
    return total_ce / n + beta * total_kl / n


def test_base_losses_equal_their_formulas() -> None:
    torch.manual_seed(3)
    ln, la, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    la[0] = torch.tensor([5.0, 1.0, 0.0, 0.0])  # one example where the top class is the label
    assert pgd_at_loss(ln, la, y).item() == pytest.approx(F.cross_entropy(la, y).item())
    assert trades_loss(ln, la, y, beta=6.0).item() == pytest.approx(_ref_trades(ln, la, y, 6.0).item(), rel=1e-5)
    assert mart_loss(ln, la, y, beta=5.0).item() == pytest.approx(_ref_mart(ln, la, y, 5.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="pgd_at"):
        get_base_loss("awp")


def _out(logits, aux):
    return ModelOutput(logits=logits, aux_logits=tuple(aux), features=logits)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ancra_loss_composition(reduction) -> None:
    torch.manual_seed(4)
    y = torch.randint(0, 5, (8,))
    mk = lambda: (torch.randn(8, 5), [torch.randn(8, 5), torch.randn(8, 5)])  # noqa: E731
    (n, na), (a, aa), (o, oa) = mk(), mk(), mk()
    alpha, zeta, gamma, beta = 0.7, 3.0, 2.0, 6.0
    lp = ancra_loss(_out(n, na), _out(a, aa), _out(o, oa), y, base_loss="trades", beta=beta, alpha=alpha,
                    zeta=zeta, gamma=gamma, aux_reduction=reduction)
    aux = [trades_loss(na[b], aa[b], y, beta=beta) + zeta * anc_loss(na[b], oa[b], alpha=alpha) for b in range(2)]
    red = sum(aux) / 2 if reduction == "mean" else sum(aux)
    expected = trades_loss(n, a, y, beta=beta) + zeta * anc_loss(n, o, alpha=alpha) + gamma * red
    assert lp.total.item() == pytest.approx(expected.item(), rel=1e-6)
    # No negative: ANC off. anc_on_aux=False: ANC only on the final output.
    off = ancra_loss(_out(n, na), _out(a, aa), None, y, base_loss="pgd_at", beta=None, alpha=alpha, zeta=zeta,
                     gamma=gamma, aux_reduction=reduction)
    at_aux = [F.cross_entropy(aa[b], y) for b in range(2)]
    red = sum(at_aux) / 2 if reduction == "mean" else sum(at_aux)
    assert off.total.item() == pytest.approx((F.cross_entropy(a, y) + gamma * red).item(), rel=1e-6)
    assert off.anc.item() == 0.0
    final_only = ancra_loss(_out(n, na), _out(a, aa), _out(o, oa), y, base_loss="pgd_at", beta=None, alpha=alpha,
                            zeta=zeta, gamma=0.0, anc_on_aux=False)
    assert final_only.aux_anc.item() == 0.0
    exp = F.cross_entropy(a, y) + zeta * anc_loss(n, o, alpha=alpha)
    assert final_only.total.item() == pytest.approx(exp.item(), rel=1e-6)
