"""The name of every per-epoch metric the trainer reports, in one place.

The trainer, the Ray worker, the scheduler, the console and MLflow all read these names; a study's
scheduler metric is checked against :func:`epoch_metrics` when the study file loads, so that a
misspelled name fails at once instead of leaving ASHA without a metric to decide on.
"""

from __future__ import annotations

# Training, averaged over the epoch's steps (``ancra_step``).
LOSS = "loss"
LOSS_PARTS = ("loss_at", "loss_anc", "loss_aux_at", "loss_aux_anc")
TRAIN_NAT_ACC = "train_nat_acc"
TRAIN_ADV_ACC = "train_adv_acc"
TRAIN_ADV_ACC_LABEL_GATE = "train_adv_acc_label_gate"  # P' gated by the label, as in the loss: ~1.0
TRAIN_NEG_ACC = "train_neg_acc"
NEG_FALLBACK_RATE = "neg_fallback_rate"
# The epoch's bookkeeping.
LR = "lr"
EPOCH_TIME_S = "epoch_time_s"
TRAIN_IMAGES_PER_S = "train_images_per_s"
VAL_TIME_S = "val_time_s"
RESUMED_AT_STEP = "resumed_at_step"  # only in an epoch resumed from a mid-epoch checkpoint: its first step

TRAINING = (LOSS, *LOSS_PARTS, TRAIN_NAT_ACC, TRAIN_ADV_ACC, TRAIN_ADV_ACC_LABEL_GATE, TRAIN_NEG_ACC,
            NEG_FALLBACK_RATE, LR, EPOCH_TIME_S, TRAIN_IMAGES_PER_S, VAL_TIME_S)

#: what the per-epoch PGD attacks (``pgd_correct``) target on RA models; models without RA: "final"
VALIDATION_TARGETS = ("final", "aux", "softgate")
SPLITS = ("val", "test")


def clean_acc(split: str) -> str:
    return f"{split}_clean_acc"


def pgd_acc(split: str, target: str) -> str:
    """Accuracy of P' on PGD examples that attacked ``target`` (final, aux, softgate)."""
    return f"{split}_pgd_acc_{target}"


def robust_acc(split: str) -> str:
    """Examples that survive every per-epoch PGD attack: the per-epoch worst case."""
    return f"{split}_robust_acc"


def validation(split: str, *, ra: bool = True) -> tuple[str, ...]:
    """The per-epoch validation metrics on ``split`` of a model with or without RA."""
    targets = VALIDATION_TARGETS if ra else ("final",)
    return (clean_acc(split), *(pgd_acc(split, t) for t in targets), robust_acc(split))


def epoch_metrics(split: str = "val") -> tuple[str, ...]:
    """Every per-epoch metric a trial may report (validation on ``split``, any model)."""
    return (*TRAINING, *validation(split, ra=True))


#: the metrics a scheduler may decide on: per-epoch validation on the held-out split
SCHEDULER_METRICS = validation("val", ra=True)
