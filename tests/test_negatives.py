import pytest
import torch

from ancra_tune.negatives import select_negatives


@pytest.mark.parametrize("strategy", ["random", "soft", "hard"])
def test_negatives_never_share_the_anchor_label(strategy) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 10, (128,), generator=gen)
        preds = torch.randint(0, 10, (128,), generator=gen)
        sel = select_negatives(labels, strategy=strategy, preds=preds, generator=gen)
        assert sel.valid.all()
        assert (labels[sel.index] != labels).all()


def test_criteria_hold_where_they_do_not_fall_back() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (128,), generator=gen)
    preds = torch.randint(0, 10, (128,), generator=gen)
    soft = select_negatives(labels, strategy="soft", preds=preds, generator=gen)
    ok = ~soft.fallback
    assert (preds[soft.index][ok] == preds[ok]).all()
    hard = select_negatives(labels, strategy="hard", preds=preds, generator=gen)
    ok = ~hard.fallback
    assert (preds[hard.index][ok] == labels[ok]).all()


def test_fallback_rate_by_hand() -> None:
    labels = torch.tensor([0, 0, 1, 2])
    preds = torch.tensor([0, 1, 1, 2])
    # soft: anchor 0 (pred 0) has no other-label example predicted 0 -> fallback;
    # anchor 1 (pred 1) -> index 2; anchor 2 (pred 1) -> index 1; anchor 3 (pred 2) -> none -> fallback.
    sel = select_negatives(labels, strategy="soft", preds=preds, generator=torch.Generator().manual_seed(0))
    assert sel.fallback.tolist() == [True, False, False, True]
    assert sel.fallback_rate.item() == 0.5
    assert sel.index[1].item() == 2 and sel.index[2].item() == 1
    # hard: anchor with label 0 needs a partner predicted 0 of another label: none -> fallback.
    hard = select_negatives(labels, strategy="hard", preds=preds, generator=torch.Generator().manual_seed(0))
    assert hard.fallback.tolist() == [True, True, False, True]
    assert hard.index[2].item() == 1  # label 1: partner predicted 1 with another label -> index 1


def test_uniform_choice_and_invalid_rows() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        counts[select_negatives(labels, strategy="random", generator=gen).index[0]] += 1
    assert counts[0] == 0 and (counts[1:] / 3000 - 1 / 3).abs().max() < 0.04
    same = select_negatives(torch.tensor([5, 5, 5]), strategy="random")
    assert not same.valid.any()
    with pytest.raises(ValueError, match="preds"):
        select_negatives(labels, strategy="soft")
    with pytest.raises(ValueError, match="random, soft, hard"):
        select_negatives(labels, strategy="nearest")
