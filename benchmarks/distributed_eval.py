"""Distributed evaluation: wall time of one checkpoint's evaluation in one process and over
N Ray workers, in one run, and whether the reports agree.

    python benchmarks/distributed_eval.py [--checkpoint CKPT] [--workers 2] [--n 128] [--batch-size 32]

Without ``--checkpoint`` it first trains a small CNN on digits for 2 epochs. Both evaluations
use the quick preset (AutoAttack APGD-CE + APGD-T included) on the same examples and batches.
On a machine with C cores the single process uses C threads and each worker C / N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mnist", help="train the small CNN on this MNIST npz (e.g. ../shared/data/mnist/train60000.npz) "
                                   "instead of digits: a validation split large enough for --n in the thousands")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ckpt = args.checkpoint
        if ckpt is None:
            from ancra_tune.config import TrainConfig
            from ancra_tune.trainer import Trainer

            data = ({"data.dataset": "npz", "data.train_file": str(Path(args.mnist).resolve()),
                     "data.train_limit": 4000, "data.val_size": 0.5} if args.mnist else {"data.dataset": "digits"})
            cfg = TrainConfig.from_dict({**data, "data.batch_size": 64, "model.name": "small_cnn",
                                         "attack.steps": 3, "attack.eps": 0.3, "attack.step_size": 0.1,
                                         "eval.pgd_steps": 0, "optim.epochs": 2, "optim.lr": 0.05,
                                         "progress": False, "out_dir": f"{d}/train"})
            Trainer(cfg).fit()
            ckpt = f"{d}/train/checkpoint.pt"
        cores = os.cpu_count() or 1
        base = [sys.executable, "-m", "trainables.cli", "eval", ckpt, "--quick", "--n", str(args.n),
                "--batch-size", str(args.batch_size), "--quiet"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        times, reports = {}, {}
        for name, extra in (("single", []),
                            ("workers", ["--workers", str(args.workers), "--cpus-per-worker",
                                         str(max(1, cores // args.workers))])):
            t = time.perf_counter()
            out = subprocess.run(base + ["--out", f"{d}/{name}"] + extra, env=env, capture_output=True, text=True)
            times[name] = time.perf_counter() - t
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            reports[name] = json.loads(Path(d, name, "report.json").read_text())
            reports[name].pop("artifacts", None)
    same = reports["single"] == reports["workers"]
    print(f"{args.n} examples, batch {args.batch_size}, {cores} cores; quick preset incl. AutoAttack "
          f"(acc {reports['single']['autoattack_acc']:.3f}), worst case {reports['single']['robust_acc_worst']:.3f}")
    print(f"single process {times['single']:6.1f} s   {args.workers} Ray workers {times['workers']:6.1f} s   "
          f"speed-up {times['single'] / times['workers']:.2f}x   (both include process start, "
          f"the workers' run also Ray's start)")
    print(f"reports identical: {same}")


if __name__ == "__main__":
    main()
