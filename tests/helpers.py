"""Small trained models shared by tests (trained once per session, in seconds)."""

from __future__ import annotations

import os
import sys
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


def ddp_mid_epoch_run(rank: int, world: int, init_file: str, cfg_dict: dict, out: str, kill_at_save: int) -> None:
    """One rank of a two-process gloo DDP run of the Trainer (torch.multiprocessing.spawn's target):
    ``kill_at_save`` > 0 stops every rank right after that mid-epoch checkpoint (a collective, so all
    at once), 0 resumes from the files there; rank 0's final weights go to ``out``/final.pt."""
    import torch.distributed as dist

    from ancra_tune.config import TrainConfig
    from ancra_tune.distributed import ddp_wrap
    from ancra_tune.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ok = False
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        trainer = Trainer(cfg, device="cpu", rank=rank, world_size=world,
                          wrap_model=lambda m: ddp_wrap(m, torch.device("cpu")))
        if kill_at_save:
            save, calls = trainer._save_partial, []

            def killing(*args, **kwargs):
                save(*args, **kwargs)
                calls.append(1)
                if len(calls) == kill_at_save:
                    raise KeyboardInterrupt

            trainer._save_partial = killing
            try:
                trainer.fit()
            except KeyboardInterrupt:
                ok = True
                return
            raise AssertionError("the run was not stopped")
        trainer.resume()
        found = trainer.resume_partial()
        resumed_at = (trainer.start_epoch, trainer._partial_state["step"] if found else 0)
        trainer.fit()
        if rank == 0:
            torch.save({"model": trainer.model.state_dict(), "history": trainer.history,
                        "resumed_at": list(resumed_at)}, f"{out}/final.pt")
        ok = True
    finally:
        dist.barrier()  # both ranks leave together (gloo aborts a process whose peer left first)
        dist.destroy_process_group()
        if ok:  # done, its files written: leave without the interpreter's teardown, where gloo's threads
            # can abort the process ("terminate called without an active exception": once in CI, under load)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
