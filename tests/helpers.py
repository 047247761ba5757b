"""Small trained models shared by tests (trained once per session, in seconds)."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from ancra_tune.attacks import pgd
from ancra_tune.config import DataConfig
from ancra_tune.data import BatchLoader, load_dataset
from ancra_tune.models import RANet, create_model


@cache
def digits_splits():
    return load_dataset(DataConfig(dataset="digits", val_size=0.2))


@cache
def trained_digits_model(ra: bool = False, adversarial: bool = True) -> RANet:
    """A small CNN trained on digits for a few epochs (PGD-AT at eps 0.1 when adversarial; with RA,
    AEs are crafted with the label gate and every auxiliary head gets its CE)."""
    s = digits_splits()
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, mean=s.info.mean, std=s.info.std, ra=ra)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    loader = BatchLoader(s.train, batch_size=64, shuffle=True, drop_last=True, seed=0)
    for epoch in range(4):
        loader.set_epoch(epoch)
        for x, y in loader:
            if adversarial:
                x = pgd(model, x, y, eps=0.1, step_size=0.03, steps=3, bn="eval", gate_labels=y if ra else None,
                        generator=gen)
            model.train()
            out = model(x, y)
            # RA: the auxiliary heads pick the gate at test time, so they are trained too (gamma = 1).
            loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(a, y) for a in out.aux_logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
