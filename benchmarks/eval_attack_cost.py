"""Where a checkpoint's evaluation spends its time: every attack of the suite on every one of k
examples (no cascade: each attack's whole cost on examples it is given), one thread, attack by
attack (wall and CPU seconds: the CPU's do not grow when other work shares the machine), with each
attack's accuracy and the worst case.

What a robust model's evaluation costs is what its surviving examples cost (an attack stops on, or
skips, an example it has fooled): this is the figure behind the plan's correction
(docs/results/table8_mnist).

    python benchmarks/eval_attack_cost.py CHECKPOINT --eps 0.3 --k 20
    python benchmarks/eval_attack_cost.py CHECKPOINT --eps 0.3 --k 20 --ra     # the RA model of its weights
"""

from __future__ import annotations

import argparse
import time

import torch

from ancra_tune.checkpoint import load_model
from ancra_tune.robustness import SuiteConfig, load_eval_data, seeded_subset
from ancra_tune.robustness.runner import run_batch
from ancra_tune.robustness.suite import plan_attacks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--k", type=int, default=20, help="examples (default 20)")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--ra", action="store_true", help="evaluate the weights as an RA model (deployment RA)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, cfg, _ = load_model(a.checkpoint, ra=True if a.ra else None)
    x, y = load_eval_data(cfg, a.split)
    idx = seeded_subset(len(y), a.k, 0)
    x, y = x[idx], y[idx]
    suite = SuiteConfig.preset_config(a.preset, eps=a.eps, n_examples=a.k, batch_size=a.k, check_examples=None,
                                      features=False)
    plan = plan_attacks(suite, ra=model.ra, has_source=False)
    times: dict[str, tuple[float, float]] = {}
    last = [time.perf_counter(), time.process_time()]

    def tick(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        times[name] = (now[0] - last[0], now[1] - last[1])
        last[:] = now

    t0, c0 = time.perf_counter(), time.process_time()
    res = run_batch(model, x, y, plan, cfg=suite, batch_idx=0, source=None, on_attack=tick,
                    check=torch.ones(a.k, dtype=torch.bool))
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    worst = res.worst.float().mean().item() if res.worst is not None else float("nan")
    print(f"{a.checkpoint}: RA {model.ra}, eps {a.eps}, {a.k} {a.split} examples, {a.threads} thread(s), preset "
          f"{a.preset}, every attack on every example")
    print(f"total {total:.1f} s wall, {cpu:.1f} s CPU = {cpu / a.k:.2f} CPU s per example; clean "
          f"{res.clean.float().mean().item():.2f}, worst case {worst:.2f}")
    for name, (t, c) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        acc = res.correct.get(name)
        shown = f"{acc.float().mean().item():.2f}" if acc is not None else "-"
        print(f"  {name:32s} {t:7.1f} s wall {c:7.1f} s CPU  {100 * c / cpu:5.1f}%  accuracy {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
