"""Train a PGD-AT and a TRADES-ANCRA small CNN on real MNIST (CPU-sized) and print the full
evaluation report of both: clean, PGD on P', adaptive attacks through every surrogate of the RA
gate (PGD, APGD-CE, APGD-T), AutoAttack, Square, transfer, the masking checks.

    python benchmarks/robustness_report.py --out runs/robustness_report
    python benchmarks/robustness_report.py --eval-only runs/robustness_report --n 200   # existing checkpoints

Each model is also the other's transfer source. Reports land in OUT/<model>/eval/report.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ancra_tune.config import TrainConfig
from ancra_tune.robustness import SuiteConfig, evaluate_checkpoint, format_report
from ancra_tune.trainer import Trainer

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

COMMON = {"data.dataset": "npz", "data.train_file": str(MNIST / "train60000.npz"),
          "data.test_file": str(MNIST / "test10000.npz"), "data.val_size": 2000, "data.batch_size": 128,
          "model.name": "small_cnn", "attack.eps": 0.3, "attack.step_size": 0.05, "attack.steps": 10,
          "eval.pgd_step_size": 0.05, "eval.max_examples": 500, "optim.lr": 0.05}

MODELS = {
    "pgd_at": {"method.base_loss": "pgd_at", "method.anc": False, "model.ra": False, "attack.init": "uniform"},
    "trades_ancra": {"method.base_loss": "trades", "method.anc": True, "model.ra": True,
                     "method.negatives_warmup_epochs": 0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/robustness_report"))
    p.add_argument("--eval-only", type=Path, help="evaluate DIR/<model>/checkpoint.pt instead of training")
    p.add_argument("--train-limit", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n", type=int, default=500, help="validation examples evaluated")
    p.add_argument("--preset", choices=("full", "quick"), default="full")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                   help="which models to evaluate (each is still the other's transfer source)")
    a = p.parse_args()
    root = a.eval_only or a.out
    ckpts = {name: root / name / "checkpoint.pt" for name in MODELS}
    if a.eval_only is None:
        for name, extra in MODELS.items():
            cfg = TrainConfig.from_dict({**COMMON, **extra, "data.train_limit": a.train_limit,
                                         "optim.epochs": a.epochs, "out_dir": str(a.out / name), "progress": False})
            t = time.perf_counter()
            Trainer(cfg).fit(resume=True)
            print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    suite = SuiteConfig.preset_config(a.preset, eps=0.3, n_examples=a.n)
    for name, other in (("pgd_at", "trades_ancra"), ("trades_ancra", "pgd_at")):
        if name not in a.models:
            continue
        t = time.perf_counter()
        report = evaluate_checkpoint(ckpts[name], suite, split="val", source=ckpts[other],
                                     out_dir=a.out / name / f"eval_{a.preset}", progress=False)
        print(f"\n===== {name} (transfer source: {other}; {a.preset} preset; {time.perf_counter() - t:.0f} s) =====")
        print(format_report(report))
        print(json.dumps({"clean_acc": report.clean_acc, "robust_acc_worst": report.robust_acc_worst,
                          "autoattack_acc": report.autoattack_acc, "flagged": report.flags("robust_acc_worst"),
                          "checks_failed": [c.name for c in report.checks if c.failed]}))


if __name__ == "__main__":
    main()
