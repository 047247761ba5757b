"""What the robustness evaluation costs, before and after the cascade, and that its worst case is no
weaker.

Two small CNNs on real MNIST (eps 0.3; trained here once, or reused from --out): a TRADES-ANCRA model
with RA (the model evaluated) and a PGD-AT model (its transfer source), as
benchmarks/robustness_report.py trains them. The quick evaluation of the test split
(`ancra-tune eval CKPT --quick --split test --n N --source OTHER`, one thread) runs two ways:

- ``all``: every attack on every example (``check_examples: null``, the evaluation before the
  cascade, and the option for papers' per-attack tables);
- ``cascade``: every attack on the first ``check_examples`` examples (the quick preset: 64; the
  checks and the per-attack accuracies are measured there), and beyond them each attack only on the
  examples every attack before it left correct (``robustness.suite.cascade_order``).

For each N it prints seconds, the model's forward passes per evaluated example (inputs through the
network; "with gradient" counts those that were followed by a backward pass), the worst case, and
whether the checks passed; for the cascade at the first N, how many examples each attack was the
first to break (what the order is measured by).

    python benchmarks/eval_cost.py --out runs/eval_cost                      # n = 200, 1000, 2000
    python benchmarks/eval_cost.py --out runs/eval_cost --n 200 --all-up-to 200
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from ancra_tune.config import TrainConfig
from ancra_tune.robustness import SuiteConfig, evaluate_checkpoint
from ancra_tune.robustness.kept import batches_here
from ancra_tune.robustness.suite import cascade_order, plan_attacks
from ancra_tune.trainer import Trainer

HERE = Path(__file__).resolve().parent


def _training_recipe() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    spec = importlib.util.spec_from_file_location("robustness_report", HERE / "robustness_report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.COMMON, mod.MODELS


class PassCounter:
    """Counts examples through the model's forward pass, and those with autograd on (each is
    followed by a backward pass in an attack)."""

    def __init__(self) -> None:
        self.forward = 0
        self.with_grad = 0

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        n = int(args[0].shape[0])
        self.forward += n
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.with_grad += n


def run(ckpt: Path, source: Path, n: int, mode: str, eps: float) -> dict[str, Any]:
    cfg = SuiteConfig.preset_config("quick", eps=eps, n_examples=n)
    if mode == "all":
        cfg = dataclasses.replace(cfg, check_examples=None)
    counter = PassCounter()
    kills: dict[str, int] = {}

    def counted(model: Any, x: Any, y: Any, c: SuiteConfig, src: Any, batches: list[int]) -> Any:
        """The batches here (a BatchRunner), their forward passes counted."""
        plan = plan_attacks(c, ra=model.ra, has_source=src is not None)
        handle = model.register_forward_hook(counter.hook)
        try:
            for r, seconds in batches_here(model, x, y, c, src, batches):
                # on the check examples: which attack broke each example first, in cascade order
                alive = r.clean[r.check] if r.check is not None else r.clean.clone()
                for i in cascade_order(plan):
                    s = plan[i]
                    if s.in_worst_case:
                        broke = alive & ~r.correct[s.name]
                        kills[s.name] = kills.get(s.name, 0) + int(broke.sum())
                        alive &= r.correct[s.name]
                yield r, seconds
        finally:
            handle.remove()

    t0 = time.perf_counter()
    report = evaluate_checkpoint(ckpt, cfg, split="test", source=source, progress=False, run=counted)
    wall = time.perf_counter() - t0
    return {"n": n, "mode": mode, "seconds": wall, "forward_per_example": counter.forward / n,
            "grad_passes_per_example": counter.with_grad / n, "worst": report.robust_acc_worst,
            "worst_correct": int(round(report.robust_acc_worst * n)), "clean": report.clean_acc,
            "check_examples": report.n_check, "checks_passed": report.checks_passed,
            "failed_checks": [c.name for c in report.checks if c.failed],
            "first_kills": {k: v for k, v in kills.items() if v}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/eval_cost"))
    p.add_argument("--n", type=int, nargs="+", default=[200, 1000, 2000])
    p.add_argument("--all-up-to", type=int, default=1000,
                   help="run the every-attack-on-every-example evaluation only up to this n (it costs n x attacks)")
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timed evaluations")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.3, help="the budget the models train and are evaluated at")
    a = p.parse_args()
    torch.set_num_threads(a.train_threads)
    common, models = _training_recipe()
    ckpts = {}
    for name in ("trades_ancra", "pgd_at"):
        out = a.out / name
        ckpts[name] = out / "checkpoint.pt"
        if not ckpts[name].is_file():
            cfg = TrainConfig.from_dict({**common, **models[name], "data.train_limit": a.train_limit,
                                         "optim.epochs": a.epochs, "out_dir": str(out), "progress": False,
                                         "attack.eps": a.eps, "attack.step_size": a.eps / 6,
                                         "eval.pgd_step_size": a.eps / 6})
            t = time.perf_counter()
            Trainer(cfg).fit()
            print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    torch.set_num_threads(a.threads)
    rows = []
    for n in a.n:
        for mode in ("all", "cascade"):
            if mode == "all" and n > a.all_up_to:
                continue
            r = run(ckpts["trades_ancra"], ckpts["pgd_at"], n, mode, a.eps)
            rows.append(r)
            print(f"n={n:>5} {mode:<8} {r['seconds']:7.1f} s  forward/example {r['forward_per_example']:7.1f}  "
                  f"with gradient {r['grad_passes_per_example']:7.1f}  worst {r['worst_correct']}/{n} "
                  f"({100 * r['worst']:.1f}%)  checks on {r['check_examples']}: "
                  f"{'pass' if r['checks_passed'] else 'fail: ' + ', '.join(r['failed_checks'])}", flush=True)
    first = next((r for r in rows if r["mode"] == "cascade"), None)
    if first:
        print(f"first kills on the check examples (n={first['n']}), in cascade order: "
              + ", ".join(f"{k} {v}" for k, v in first["first_kills"].items()))
    lines = ["| n | evaluation | seconds | forward passes / example | of them with gradient | worst case | "
             "checks (on n) |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['mode']} | {r['seconds']:.1f} | {r['forward_per_example']:.1f} | "
                     f"{r['grad_passes_per_example']:.1f} | {r['worst_correct']}/{r['n']} | "
                     f"{'pass' if r['checks_passed'] else 'fail'} ({r['check_examples']}) |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
