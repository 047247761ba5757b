import pytest
import torch

from ancra_tune.negatives import select_negatives


@pytest.mark.parametrize("strategy", ["random", "soft", "hard", "easy"])
@pytest.mark.parametrize("pick", ["max_logit", "uniform"])
def test_negatives_never_share_the_anchor_label(strategy, pick) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 10, (128,), generator=gen)
        logits = torch.randn(128, 10, generator=gen)
        sel = select_negatives(labels, strategy=strategy, logits=logits, pick=pick, generator=gen)
        assert sel.valid.all()
        assert (labels[sel.index] != labels).all()


def test_random_draws_a_class_first_as_released() -> None:
    """Unbalanced batch: anchor 0 (label 0) sees class 1 once and class 2 four times. The released
    draw picks each other class with probability 1/2, then one of its examples; the per-example
    option picks each of the 5 examples with probability 1/5."""
    labels = torch.tensor([0, 1, 2, 2, 2, 2])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    by_class = torch.zeros(6)
    by_example = torch.zeros(6)
    for _ in range(n):
        by_class[select_negatives(labels, strategy="random", generator=gen).index[0]] += 1
        by_example[select_negatives(labels, strategy="random", random_draw="example", generator=gen).index[0]] += 1
    p_class, p_example = by_class / n, by_example / n
    assert p_class[0] == 0 and abs(p_class[1] - 0.5) < 0.03 and abs(p_class[2:].sum() - 0.5) < 0.03
    assert (p_class[2:] - 0.125).abs().max() < 0.03  # uniform within the class
    assert (p_example[1:] - 0.2).abs().max() < 0.03
    same = select_negatives(torch.tensor([5, 5, 5]), strategy="random")
    assert not same.valid.any()


def test_criteria_pick_the_largest_logit_of_the_anchors_label() -> None:
    # labels    0  0  1  1  2  3
    # predicted 0  1  1  0  1  3   (argmax of the logits below)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    logits = torch.full((6, 4), -5.0)
    for i, (pred, score0, score1) in enumerate([(0, 0, 0), (1, 0, 0), (1, 1.0, 0), (0, 0, 2.0), (1, 3.0, 0),
                                                 (3, 0.5, 1.5)]):
        logits[i, pred] = 10.0
        if pred != 0:
            logits[i, 0] = score0
        if pred != 1:
            logits[i, 1] = score1
    gen = torch.Generator().manual_seed(0)
    kw = dict(logits=logits, generator=gen)
    # soft: same predicted class as the anchor, another label. Anchor 1 (pred 1, label 0): candidates
    # 2 and 4 (pred 1, labels 1 and 2); the largest logit of class 0 is example 4's (3.0).
    soft = select_negatives(labels, strategy="soft", **kw)
    assert soft.index[1].item() == 4 and not soft.fallback[1]
    # Anchor 2 (pred 1, label 1): candidates 1 (label 0) and 4 (label 2); logit of class 1: both 10.0
    # -> the first maximum, example 1.
    assert soft.index[2].item() == 1
    # Anchor 5 (pred 3) has no other example predicted 3: random fallback.
    assert soft.fallback[5] and labels[soft.index[5]] != 3
    # hard: predicted as the anchor's label. Anchor 0 (label 0): examples predicted 0 with another
    # label: 3 (label 1). Anchor 2 (label 1): predicted 1 with another label: 1 and 4; logit of
    # class 1 is 10 for both -> 1.
    hard = select_negatives(labels, strategy="hard", **kw)
    assert hard.index[0].item() == 3 and hard.index[2].item() == 1
    # easy: predicted neither as the anchor's label nor as the anchor's prediction. Anchor 0
    # (label 0, pred 0): candidates predicted 1 or 3 with another label: 2, 4, 5; logit of class 0:
    # 1.0, 3.0, 0.5 -> 4.
    easy = select_negatives(labels, strategy="easy", **kw)
    assert easy.index[0].item() == 4
    assert easy.fallback_rate.item() == pytest.approx(easy.fallback.float().mean().item())
    # The released fallback rate: share of anchors whose criterion had no candidate.
    assert soft.fallback.tolist() == [False, False, False, False, False, True]


def test_uniform_pick_option_and_errors() -> None:
    labels = torch.tensor([0, 1, 1, 1])
    preds = torch.tensor([0, 0, 0, 0])  # anchor 0 (label 0): soft candidates 1, 2, 3
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        counts[select_negatives(labels, strategy="soft", preds=preds, pick="uniform", generator=gen).index[0]] += 1
    assert counts[0] == 0 and (counts[1:] / 3000 - 1 / 3).abs().max() < 0.04
    with pytest.raises(ValueError, match="preds"):
        select_negatives(labels, strategy="soft")
    with pytest.raises(ValueError, match="logits"):
        select_negatives(labels, strategy="hard", preds=preds)  # max_logit needs the logits
    with pytest.raises(ValueError, match="random, soft, hard, easy"):
        select_negatives(labels, strategy="nearest")
