"""Deliberately masked models and the checks' verdicts on them.

Wraps a PGD-AT small CNN (trained on digits here, or any checkpoint with --checkpoint) in each
masking of ``ancra_tune.robustness.masked`` and evaluates the honest model, each masked one, and
(with --ra-checkpoint) an RA model with the quick and/or full preset. For each it prints the
worst case, the strongest independent reference (PGD-40 transferred from the unmasked model and a
5000-query Square of another seed) and which checks fail.

    python benchmarks/masked_models.py --checkpoint runs/robustness_report/pgd_at/checkpoint.pt \
        --ra-checkpoint runs/robustness_report/trades_ancra/checkpoint.pt --n 200
"""

from __future__ import annotations

import argparse
import time

import torch

from ancra_tune.checkpoint import load_model
from ancra_tune.robustness import SuiteConfig, build_report, evaluate_model, load_eval_data, seeded_subset
from ancra_tune.robustness.masked import KINDS, MaskedModel, reference_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a PGD-AT (RA off) checkpoint to mask")
    p.add_argument("--ra-checkpoint", help="also evaluate this RA model")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--presets", default="quick,full")
    a = p.parse_args()
    base, cfg, info = load_model(a.checkpoint)
    x, y = load_eval_data(cfg, "val")
    idx = seeded_subset(x.shape[0], a.n, 0)
    x, y = x[idx], y[idx]
    eps = cfg.attack.eps
    models = {"honest (PGD-AT)": base, **{k: MaskedModel(base, k).eval() for k in KINDS}}
    if a.ra_checkpoint:
        models["RA (TRADES-ANCRA)"] = load_model(a.ra_checkpoint)[0]
    print(f"{a.n} validation examples, eps {eps:g}")
    print("| model | preset | worst case | reference | flagged | failing checks | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        ref = reference_accuracy(model, base, x, y, eps=eps)
        for preset in a.presets.split(","):
            suite = SuiteConfig.preset_config(preset, eps=eps, n_examples=None, features=False)
            torch.manual_seed(0)
            t = time.perf_counter()
            report = build_report(evaluate_model(model, x, y, suite, progress=False), suite, ra=model.ra,
                                  n_classes=info.num_classes, has_source=False)
            failing = ", ".join(f"{c.name} [{c.scope}]" for c in report.checks if c.failed) or "none"
            print(f"| {name} | {preset} | {report.robust_acc_worst:.3f} | {ref:.3f} | "
                  f"{'yes' if report.flagged else 'no'} | {failing} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
