import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_splits, trained_digits_model

from ancra_tune.attacks import bn_mode, pgd, project, random_start

EPS = 0.1


@pytest.fixture(scope="module")
def batch():
    s = digits_splits()
    x = s.val.images[:128].float() / 255
    return x, s.val.labels[:128]


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x).logits, y, reduction="none")


def test_project_and_random_start_stay_in_the_ball() -> None:
    x = torch.rand(16, 1, 8, 8)
    far = x + torch.randn_like(x) * 5
    p = project(far, x, 0.05)
    assert (p - x).abs().max() <= 0.05 + 1e-7 and p.min() >= 0 and p.max() <= 1
    for init in ("uniform", "none"):
        r = random_start(x, eps=0.05, init=init, init_std=0.001, generator=torch.Generator().manual_seed(0))
        assert (r - x).abs().max() <= 0.05 + 1e-7 and r.min() >= 0 and r.max() <= 1
    # As released: x + 0.001 * N(0, 1), not clipped before the first step (a pixel at 0 may start below 0).
    g = random_start(x, eps=0.05, init="gaussian", init_std=0.001, generator=torch.Generator().manual_seed(0))
    assert 0 < (g - x).abs().max() < 0.01
    torch.testing.assert_close(g - x, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 0.001)
    # Every attack step projects: even one step lands in S(x).
    model = trained_digits_model()
    out = pgd(model, x.expand(-1, 1, 8, 8), torch.zeros(16, dtype=torch.long), eps=0.05, step_size=0.01, steps=1,
              bn="eval", init="gaussian", generator=torch.Generator().manual_seed(0))
    assert (out - x).abs().max() <= 0.05 + 1e-7 and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_untargeted_pgd_in_ball_and_beats_noise(batch, objective) -> None:
    model = trained_digits_model()
    x, y = batch
    ref = F.softmax(model(x).logits, 1).detach() if objective == "kl" else None
    x_adv = pgd(model, x, y, eps=EPS, step_size=0.025, steps=10, bn="eval", objective=objective, ref_probs=ref,
                generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    noise = project(x + (torch.rand_like(x) * 2 - 1).sign() * EPS, x, EPS)
    clean, noisy, adv = _ce(model, x, y).mean(), _ce(model, noise, y).mean(), _ce(model, x_adv, y).mean()
    assert adv > noisy > 0 and adv > 2 * clean
    acc = lambda z: (model(z).logits.argmax(1) == y).float().mean().item()  # noqa: E731
    assert acc(x_adv) < acc(noise) - 0.1


def test_targeted_pgd_moves_toward_target(batch) -> None:
    model = trained_digits_model(adversarial=False)
    x, y = batch
    target = (y + 1) % 10
    x_t = pgd(model, x, target, eps=EPS, step_size=0.025, steps=10, bn="eval", targeted=True,
              generator=torch.Generator().manual_seed(0))
    assert (x_t - x).abs().max() <= EPS + 1e-6
    assert _ce(model, x_t, target).mean() < _ce(model, x, target).mean() - 0.5
    hit = (model(x_t).logits.argmax(1) == target).float().mean()
    assert hit > (model(x).logits.argmax(1) == target).float().mean() + 0.1


def test_joint_batched_attack_equals_two_separate_attacks(batch) -> None:
    """AEs and OEs crafted in one batch (one pass per step) equal two separate attacks."""
    model = trained_digits_model(ra=True)
    x, y = batch
    x, y = x[:32], y[:32]
    x_neg = x.flip(0)
    kw = dict(eps=EPS, step_size=0.025, steps=5, bn="eval", init="none")
    ae = pgd(model, x, y, **kw)
    oe = pgd(model, x_neg, y, targeted=True, **kw)
    mask = torch.arange(64) >= 32
    both = pgd(model, torch.cat([x, x_neg]), torch.cat([y, y]), targeted=mask, **kw)
    torch.testing.assert_close(both[:32], ae)
    torch.testing.assert_close(both[32:], oe)


def test_one_step_follows_the_released_attack_objective(batch) -> None:
    """The released training attack ascends CE(P') + w * mean_b CE(P_b) (u_pgd) and descends the same
    toward the target (t_pgd), eval-mode BatchNorm, predicted gate: one step by hand."""
    from ancra_tune.step import attack_loss

    model = trained_digits_model(ra=True).eval()
    x, y = batch
    x, y = x[:32], y[:32]
    w = 2.0
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    obj = F.cross_entropy(out.logits, y, reduction="sum") + w * sum(
        F.cross_entropy(a, y, reduction="sum") for a in out.aux_logits) / len(out.aux_logits)
    (g,) = torch.autograd.grad(obj, xr)
    g_final = torch.autograd.grad(F.cross_entropy(model(xr).logits, y, reduction="sum"), xr)[0]
    assert (g.sign() != g_final.sign()).any()  # the auxiliary heads change the direction
    kw = dict(eps=EPS, step_size=0.02, steps=1, bn="eval", init="none")
    up = pgd(model, x, y, loss_fn=attack_loss(aux_weight=w), **kw)
    torch.testing.assert_close(up, project(x + 0.02 * g.sign(), x, EPS))
    down = pgd(model, x, y, targeted=True, loss_fn=attack_loss(aux_weight=w), **kw)
    torch.testing.assert_close(down, project(x - 0.02 * g.sign(), x, EPS))
    # The P'-only option ignores the auxiliary heads.
    only = pgd(model, x, y, loss_fn=attack_loss(aux_weight=0.0), **kw)
    torch.testing.assert_close(only, project(x + 0.02 * g_final.sign(), x, EPS))


def test_bn_mode_is_explicit_and_restored(batch) -> None:
    # A copy: this test changes BatchNorm's running statistics, and the cached model is shared by
    # other tests (test_masking's numbers moved when it ran after this one).
    model = copy.deepcopy(trained_digits_model())
    x, y = batch
    bn = model.stem[0][1]
    before = bn.running_mean.clone()
    model.eval()
    pgd(model, x, y, eps=EPS, step_size=0.025, steps=2, bn="eval")
    assert not model.training and torch.equal(bn.running_mean, before)
    model.train()
    pgd(model, x, y, eps=EPS, step_size=0.025, steps=2, bn="train")
    assert model.training and not torch.equal(bn.running_mean, before)  # batch statistics were used
    bn.running_mean.copy_(before)
    with pytest.raises(ValueError):
        with bn_mode(model, "test"):  # type: ignore[arg-type]
            pass
    model.eval()
