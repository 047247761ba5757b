"""Does moving a running study to another commit change what it trains or measures? Check before switching.

A study too long for one session may resume at a newer commit (``--resume`` picks up the trials'
checkpoints and their evaluations' kept batches). That is only honest when the newer code trains
the same models and measures them the same way: this trains every configuration of the study's grid
(its first seed) for a few steps at both commits, each in a git worktree of its own and a process
of its own, and compares the weights, momentum buffers and the steps' losses bit for bit; with
``--eval-examples N`` it also runs the study's own end-of-trial evaluation (its suite, AutoAttack
and the adaptive attacks included, every attack on every example) on N held-out examples of each
trained model, and compares every per-example outcome. It says "same" only if every one is identical.

    python scripts/same_training.py search_spaces/table8_mnist.yaml --base fbcf603            # vs HEAD
    python scripts/same_training.py search_spaces/table8_mnist.yaml --base fbcf603 --head ee0c6ce --steps 5
    python scripts/same_training.py search_spaces/table8_mnist.yaml --base d923040 --eval-examples 16
    python scripts/same_training.py search_spaces/table8_mnist.yaml --base d923040 --eval-examples 8 \
        --eval-batch-size 4 --spare-cpus     # at HEAD the second batch on a spare CPU's helper

The study file is read at ``--head``'s commit; a sweep's configurations are its search space's
default point. One thread per process, as a trial's worker has.
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

# Run inside each worktree: train each configuration `steps` steps, save the states.
TRAIN = r"""
import json, sys
import torch
from trainables.study import load_study
from ancra_tune.trainer import Trainer

study_file, steps, out, n_eval = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
eval_batch, spare = int(sys.argv[5]), sys.argv[6] == "1"
torch.set_num_threads(1)
if spare:  # a local Ray whose CPUs nobody holds: the evaluation's helper takes the last batches
    from trainables.ray_session import init_ray
    init_ray(None, num_cpus=2)
study = load_study(study_file)
points = study.grid_points() if study.kind == "ablation" else [study.default_point()]
states, losses, reports = {}, {}, {}
for point in points:
    cfg = study.train_config(point, study.seeds[0])
    cfg = cfg.replace(**{"data.train_limit": steps * cfg.data.batch_size, "optim.epochs": 1,
                         "eval.pgd_steps": 0, "progress": False, "out_dir": out + "/run"})
    t = Trainer(cfg)
    m = t.fit()
    key = json.dumps(point, sort_keys=True)
    states[key] = {"model": t.model.state_dict(),
                   "momentum": [s["momentum_buffer"] for s in t.optimizer.state_dict()["state"].values()]}
    losses[key] = {k: v for k, v in m.items() if not k.endswith("_s") and k != "train_images_per_s"}
    if n_eval and study.suite is not None:  # the study's own evaluation, every attack on every example
        import dataclasses
        from trainables.trial_eval import evaluate_trial

        suite = dataclasses.replace(study.suite, n_examples=n_eval, check_examples=None)
        if eval_batch:
            suite = dataclasses.replace(suite, batch_size=eval_batch)
        spent = {}
        kw = {}
        if spare:  # the API of each revision since 21e28d0
            from trainables import spare_cpus
            kw = {"run": spare_cpus.for_trial(t.model)} if hasattr(spare_cpus, "for_trial") else {"spare_cpus": True}
        reports[key] = evaluate_trial(t, suite, spent=spent, **kw).to_dict()
        reports[key]["_helped"] = spent.get("batches_helped", 0)
torch.save(states, out + "/states.pt")
json.dump(losses, open(out + "/losses.json", "w"))
json.dump(reports, open(out + "/reports.json", "w"))
"""


def _rev(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def _train_at(rev: str, study_file: str, steps: int, work: Path, n_eval: int = 0, eval_batch: int = 0,
              spare: bool = False) -> Path:
    tree, out = work / f"tree-{rev}", work / f"out-{rev}"
    out.mkdir(parents=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, capture_output=True, check=True)
    try:
        shared = ROOT.parent / "shared"  # data paths in the study files are relative to ../shared
        if shared.exists() and not (tree.parent / "shared").exists():
            (tree.parent / "shared").symlink_to(shared)
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        subprocess.run([sys.executable, "-c", TRAIN, study_file, str(steps), str(out), str(n_eval), str(eval_batch),
                        "1" if spare else "0"], cwd=tree, env=env, check=True)
        print(f"  {rev}: trained{' and evaluated' if n_eval else ''} in {time.time() - t0:.0f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", help="the study file, as a path inside the repository")
    ap.add_argument("--base", required=True, help="the commit the study runs at now")
    ap.add_argument("--head", default="HEAD", help="the commit to move it to (default: HEAD)")
    ap.add_argument("--steps", type=int, default=5, help="training steps per configuration (default 5)")
    ap.add_argument("--eval-examples", type=int, default=0, metavar="N",
                    help="also run the study's evaluation on N held-out examples of each trained model and compare "
                         "every per-example outcome (default 0: training only)")
    ap.add_argument("--eval-batch-size", type=int, default=0, metavar="B",
                    help="the evaluation's batch size at both commits (default: the study's)")
    ap.add_argument("--spare-cpus", action="store_true",
                    help="at --head, evaluate inside a local Ray of 2 free CPUs, so that a helper on a spare CPU "
                         "takes the last batches (trainables.spare_cpus); give --eval-batch-size so there are several")
    a = ap.parse_args(argv)
    import torch

    base, head = _rev(a.base), _rev(a.head)
    print(f"{a.study}: {a.steps} steps per configuration at {base} and at {head}", flush=True)
    with tempfile.TemporaryDirectory(prefix="same-training-", dir=ROOT.parent) as d:
        outs = {rev: _train_at(rev, a.study, a.steps, Path(d), a.eval_examples, a.eval_batch_size,
                               a.spare_cpus and rev == head) for rev in (base, head)}
        states = {rev: torch.load(o / "states.pt", weights_only=True) for rev, o in outs.items()}
        losses = {rev: json.loads((o / "losses.json").read_text()) for rev, o in outs.items()}
        reports = {rev: json.loads((o / "reports.json").read_text()) if (o / "reports.json").is_file() else {}
                   for rev, o in outs.items()}
    same_all = True
    for key, s0 in states[base].items():
        s1 = states[head].get(key)
        same = s1 is not None and all(torch.equal(v, s1["model"][k]) for k, v in s0["model"].items()) \
            and all(torch.equal(x, y) for x, y in zip(s0["momentum"], s1["momentum"], strict=True)) \
            and losses[base][key] == losses[head][key]
        same_all &= same
        print(f"  {key}: {'same, bit for bit' if same else 'DIFFERENT'} (loss {losses[base][key].get('loss')} "
              f"vs {(losses[head].get(key) or {}).get('loss')})")
        if a.eval_examples:
            r0, r1 = reports[base].get(key), reports[head].get(key)
            helped = [int((r or {}).pop("_helped", 0)) for r in (r0, r1)]
            differ = sorted(k for k in set(r0 or {}) | set(r1 or {}) if (r0 or {}).get(k) != (r1 or {}).get(k))
            same_eval = r0 is not None and not differ
            same_all &= same_eval
            shown = (f"{len(r0['per_example']['outcomes'])} outcome lists (clean, worst case, each attack) x "
                     f"{r0['n_examples']} examples, worst case {r0['robust_acc_worst']}" if r0 else "none")
            print(f"    its evaluation: {'same, every per-example outcome' if same_eval else 'DIFFERENT'} ({shown}"
                  f"{'; differs in ' + ', '.join(differ) if differ else ''}"
                  f"{f'; at {head} a spare CPU evaluated {helped[1]} of its batches' if a.spare_cpus else ''})")
    what = "training and evaluation" if a.eval_examples else "training"
    print(f"same {what} at both commits" if same_all else f"the commits differ in {what}: do not switch")
    return 0 if same_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
