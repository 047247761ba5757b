"""Throughput and efficiency of one ANCRA training step (TRADES-ANCRA, targeted negatives, RA on).

Efficiency = (time of the passes the step cannot avoid) / (time of the step), both measured
on the same model and batch in the same run, interleaved so machine noise hits both alike:

  unavoidable = steps x [forward + backward-to-input on 2B images, eval mode]   (AEs + OEs)
              + forward + backward-to-weights on 3B images in train mode        (x, x^a, x^o)
              + the optimizer update

Everything else in a step (random starts, projections, negative selection, the loss
arithmetic, Python) is overhead. Run:

    python benchmarks/bench_step.py                      # small CNN and ResNet-18, CPU
    python benchmarks/bench_step.py --models resnet18 --batch 128 --device cuda   # adds bf16 and channels-last

Each model runs the released schedule and the speed options (attack.schedule batched,
method.joint_forward true: see the README for what they change).

Prints a table and writes JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ancra_tune.checkpoint import build_model
from ancra_tune.config import TrainConfig
from ancra_tune.data import DataInfo, load_npz
from ancra_tune.step import ancra_step

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train10000.npz"


def _batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if SHARED.is_file():  # real CIFAR-10 images when the shared data is beside the repo
        data, _ = load_npz(SHARED)
        return data.images[:n].float().div(255).to(device), data.labels[:n].to(device)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model_name: str, batch: int, device: torch.device, *, precision: str, channels_last: bool,
          rounds: int, warmup: int, fast: bool = False) -> dict[str, float | str]:
    """fast: the speed options (one AE+OE attack batch of 2B, one loss forward of 3B) instead of
    the released schedule (OE attack, then AE attack; three loss forwards)."""
    speed = {"attack.schedule": "batched", "method.joint_forward": True} if fast else {}
    cfg = TrainConfig.from_dict({"model.name": model_name, "method.base_loss": "trades", "method.anc": True,
                                 "method.targeted": True, "model.ra": True, "precision": precision,
                                 "channels_last": channels_last, "progress": False, **speed})
    info = DataInfo(num_classes=10, in_channels=3, image_size=32, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2471, 0.2435, 0.2616), classes=tuple(map(str, range(10))))
    torch.manual_seed(0)
    model = build_model(cfg, info).to(device)
    mf = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    x, y = _batch(batch, device)
    x = x.contiguous(memory_format=mf)
    gen = torch.Generator().manual_seed(0)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and device.type == "cuda"
           else contextlib.nullcontext())
    steps = cfg.attack.steps

    def full_step() -> None:
        loss, _ = ancra_step(model, x, y, cfg=cfg, epoch=0, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x2, y2 = torch.cat([x, x]), torch.cat([y, y])
    x3, y3 = torch.cat([x, x, x]), torch.cat([y, y, y])

    def attack_pass() -> None:  # one attack iteration's unavoidable work
        model.eval()
        xa = x2.detach().requires_grad_(True)
        with amp:
            out = model(xa).logits
            loss = torch.nn.functional.cross_entropy(out, y2, reduction="sum")
        torch.autograd.grad(loss, xa)

    def loss_pass() -> None:  # the training forward/backward and update
        model.train()
        with amp:
            out = model(x3, y3)
            loss = torch.nn.functional.cross_entropy(out.logits, y3) + sum(
                torch.nn.functional.cross_entropy(a, y3) for a in out.aux_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(warmup):
        full_step(), attack_pass(), loss_pass()
    t_step, t_attack, t_loss = [], [], []
    for _ in range(rounds):  # interleaved: noise hits all three alike
        t_step.append(timed(full_step))
        t_attack.append(timed(attack_pass))
        t_loss.append(timed(loss_pass))
    model.load_state_dict(state)
    step = statistics.median(t_step)
    unavoidable = steps * statistics.median(t_attack) + statistics.median(t_loss)
    return {"model": model_name, "device": str(device), "precision": precision,
            "channels_last": channels_last, "schedule": "fast" if fast else "released", "batch": batch,
            "step_s": step, "unavoidable_s": unavoidable,
            "efficiency": unavoidable / step, "images_per_s": batch / step}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    p.add_argument("--batch", type=int, default=None, help="default: 128 (small_cnn), 32 (resnet18 on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    variants = [("fp32", False, False), ("fp32", False, True)]
    if device.type == "cuda":
        variants += [("bf16", False, False), ("fp32", True, False), ("bf16", True, False), ("bf16", True, True)]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}", file=sys.stderr)
    for name in a.models:
        batch = a.batch or (32 if name != "small_cnn" and device.type == "cpu" else 128)
        for precision, cl, fast in variants:
            r = bench(name, batch, device, precision=precision, channels_last=cl, rounds=a.rounds, warmup=a.warmup,
                      fast=fast)
            rows.append(r)
            print(f"{r['model']:<12} {r['device']:<5} {r['precision']:<5} cl={int(cl)} {r['schedule']:<8} "
                  f"batch={batch:<4} "
                  f"step={r['step_s'] * 1e3:8.1f} ms  unavoidable={r['unavoidable_s'] * 1e3:8.1f} ms  "
                  f"efficiency={r['efficiency']:.3f}  {r['images_per_s']:8.1f} img/s", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
