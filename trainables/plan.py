"""``ancra-tune plan STUDY --detect 0.03``: what a study must evaluate to resolve a difference, and what
that costs, before anything is paid.

The difference two rows of a study can resolve (two-sided 5%, 80% power) depends on the examples
each seed is evaluated on, the seeds, the accuracy near which rows are compared and the seeds' own
spread (:func:`ancra_tune.robustness.stats.mde`). Those, and the cost per epoch and per evaluated
example, come from the study's own records when it ran before (its ``summary.json``); otherwise the
accuracy is taken at 50% (the largest binomial variance: a plan that holds anywhere), the seeds'
spread at 0 (said so), and the costs are measured here by a short probe of the study's own
configurations (a few training batches, the study's evaluation suite on a few examples).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ancra_tune.robustness import stats

from .study import Study

TRIAL_OVERHEAD_S = 13.0  # Tune-over-Train start-up per trial measured on the 2-core machine (README)
PROBE_BATCHES = 3
PROBE_EXAMPLES = 8
PROBE_SURVIVORS = 4
# The evaluation's cost per example depends on what survives: an attack stops on (or skips) an example
# it has fooled, and the cascade sends only the survivors on. A model trained a few batches is fooled
# at once, so the probe also times examples that nothing can fool: correctly classified ones at a
# vanishing eps, on which every attack spends its whole budget (Square all its queries, APGD every
# iteration, AutoAttack every attack): what a robust model's surviving examples cost.
SURVIVOR_EPS = 1e-6


def _rows(study: Study) -> list[dict[str, Any]]:
    return study.grid_points() if study.kind == "ablation" else [study.default_point()]


def records(study: Study, storage: str) -> dict[str, Any] | None:
    """What a previous run of the study measured: worst-case accuracy, seeds' spread, time per epoch and
    per evaluated example (None when it never finished a trial here)."""
    path = Path(storage) / study.name / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = [t for t in summary.get("trials", []) if t.get("status") == "finished" and t.get("eval_n_examples")]
    if not done:
        return None
    worst = [t["robust_acc_worst"] for t in done if t.get("robust_acc_worst") is not None]
    groups: dict[str, list[float]] = {}
    for t in done:
        key = json.dumps({k: v for k, v in t["params"].items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(t.get("robust_acc_worst") or 0.0)
    n = int(np.median([t["eval_n_examples"] for t in done]))
    spreads = [stats.seed_spread(v, n) for v in groups.values() if len(v) > 1]
    per_example = [t["eval_time_s"] / t["eval_n_examples"] for t in done if t.get("eval_time_s")]
    epochs = [t["time_per_epoch_s"] for t in done if t.get("time_per_epoch_s")]
    return {"source": f"the study's own records ({path}, {len(done)} finished trials)",
            "accuracy": float(np.mean(worst)) if worst else 0.5,
            "seed_sd": float(np.sqrt(np.mean(np.square(spreads)))) if spreads else 0.0,
            "epoch_s": float(np.mean(epochs)) if epochs else None,
            "eval_s_per_example": float(np.mean(per_example)) if per_example else None}


def probe(study: Study, *, progress: bool = True, survive: float = 0.5) -> dict[str, Any]:
    """Measure, on this machine, a training epoch and the evaluation per example of each row's
    configuration (each row's, and the most expensive row's for a sweep), with the intra-op threads
    a trial's worker gets (a probe with every core would be as fast as one trial alone, and the plan
    then divides by the trials that run at once: it would count the cores twice). An evaluated
    example is charged ``survive`` x what one that survives every attack costs, plus the rest x what
    one fooled at once costs (``survive``: the worst-case accuracy the plan assumes)."""
    import torch

    from .worker import worker_threads

    threads = worker_threads(study.resources.cpus_per_worker)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cost = _probe(study, progress=progress, survive=survive)
    finally:
        torch.set_num_threads(before)
    cost["source"] += f", {threads} thread(s) as each trial's worker gets"
    return cost


def eval_cost(model: Any, x: Any, y: Any, suite: Any) -> tuple[float, float]:
    """(seconds, inputs through the model) per example of ``suite`` on (x, y), in one batch."""
    from ancra_tune.robustness.runner import evaluate_model

    rows = [0]
    hook = model.register_forward_hook(lambda m, args, out: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    try:
        k = x.shape[0]
        t0 = time.perf_counter()
        evaluate_model(model, x, y, replace(suite, batch_size=k, n_examples=k), progress=False)
        return (time.perf_counter() - t0) / k, rows[0] / k
    finally:
        hook.remove()


def survivors(model: Any, x: Any, y: Any, k: int) -> Any:
    """Indices of up to ``k`` examples the model classifies correctly."""
    import torch

    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).logits.argmax(1) for i in range(0, x.shape[0], 256)])
    return (pred == y).nonzero().squeeze(1)[:k]


def _probe(study: Study, *, progress: bool, survive: float = 0.5) -> dict[str, Any]:
    import torch

    from ancra_tune.data import load_dataset
    from ancra_tune.trainer import Trainer

    epoch_s, eval_s, parts = [], [], []
    splits = None
    rows = _rows(study)
    for i, point in enumerate(rows):
        cfg = study.train_config(point, study.seeds[0])
        if splits is None:
            splits = load_dataset(cfg.data)
        bs = cfg.data.batch_size
        full = len(splits.train)
        small = replace(splits, train=splits.train.subset(torch.arange(min(full, bs * PROBE_BATCHES))))
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(cfg.replace(**{"optim.epochs": 1, "progress": False}), splits=small, out_dir=out,
                              device="cpu")
            trainer.train_epoch(0)  # warm-up (first-call allocations)
            t0 = time.perf_counter()
            trainer.train_epoch(0)
            per_batch = (time.perf_counter() - t0) / max(1, len(small.train) // bs)
            epoch_s.append(per_batch * (full // bs))
            model = trainer.model.eval()
            k = min(PROBE_EXAMPLES, len(splits.val))
            x, y = splits.val.images[:k].float().div(255.0), splits.val.labels[:k]
            fooled, _ = eval_cost(model, x, y, study.suite)
            pool_x, pool_y = splits.val.images[:512].float().div(255.0), splits.val.labels[:512]
            keep = survivors(model, pool_x, pool_y, PROBE_SURVIVORS)
            survived = fooled
            if keep.numel():
                survived, _ = eval_cost(model, pool_x[keep], pool_y[keep], replace(study.suite, eps=SURVIVOR_EPS))
            parts.append({"survivor": survived, "fooled": fooled})
            eval_s.append(survive * survived + (1 - survive) * fooled)
        if progress:
            print(f"  probe {i + 1}/{len(rows)}: {point or 'base'}: epoch ~{epoch_s[-1]:.0f} s, "
                  f"evaluation {eval_s[-1]:.2f} s/example ({parts[-1]['survivor']:.2f} s for one that survives "
                  f"every attack, {parts[-1]['fooled']:.2f} s for the first ones, on which a model trained "
                  f"{PROBE_BATCHES} batches is mostly fooled at once)", file=sys.stderr, flush=True)
    return {"source": f"a probe on this machine ({PROBE_BATCHES} training batches, {PROBE_EXAMPLES} evaluated "
                      f"examples and {PROBE_SURVIVORS} that no attack fools per configuration, an evaluated example "
                      f"charged {100 * survive:.0f}% of the survivors' cost as the assumed accuracy says; an ablation "
                      "adds its rows' own costs, a sweep is charged its most expensive row)",
            "epoch_s": max(epoch_s), "eval_s_per_example": max(eval_s),
            "rows": [{"epoch_s": e, "eval_s_per_example": v, "eval_s_survivor": p["survivor"],
                      "eval_s_fooled": p["fooled"]} for e, v, p in zip(epoch_s, eval_s, parts, strict=True)]}


def val_examples(study: Study) -> int | None:
    """Examples in the validation split the study evaluates on (the most a seed can be evaluated on);
    None when the dataset cannot be read here."""
    from ancra_tune.data import DatasetUnavailableError, load_dataset

    try:
        return len(load_dataset(study.train.data).val)
    except (DatasetUnavailableError, OSError, ValueError):
        return None


def make_plan(study: Study, detect: float, *, storage: str, seeds: int | None = None, measure: bool = True,
              available: int | None = None) -> dict[str, Any]:
    """The plan as a dict (what ``--json`` prints)."""
    if not 0 < detect < 1:
        raise ValueError(f"--detect {detect} must be a difference of accuracy in (0, 1), e.g. 0.03 for 3 points")
    rec = records(study, storage)
    acc = rec["accuracy"] if rec else 0.5
    sd = rec["seed_sd"] if rec else 0.0
    cost = dict(rec) if rec and rec.get("epoch_s") and rec.get("eval_s_per_example") else None
    if cost is None and measure:
        cost = probe(study, survive=acc)
    s_now = len(study.seeds)
    avail = available if available is not None else val_examples(study)
    n_now = study.suite.n_examples or avail
    rows = len(_rows(study)) if study.kind == "ablation" else 2
    cpu = study.resources.trial_total["CPU"]
    slots = max(1, int((os.cpu_count() or 1) // cpu)) if cpu else 1
    if study.search.max_concurrent:
        slots = min(slots, study.search.max_concurrent)
    options = []
    for s in sorted({seeds or s_now, 3, 5} if seeds is None else {seeds}):
        need = stats.examples_needed(detect, acc, s, seed_sd=sd)
        opt: dict[str, Any] = {"seeds": s, "examples_per_seed": need,
                               "examples_per_row": None if need is None else need * s,
                               "fits_validation_split": None if avail is None else need is not None and need <= avail}
        if need is not None and cost is not None:
            opt.update(_predicted(study, cost, s, need, slots))
        options.append(opt)
    as_written = _predicted(study, cost, s_now, n_now, slots) if cost is not None and n_now else {}
    return {"study": study.name, "kind": study.kind, "detect": detect, "rows": rows,
            "now": {"seeds": s_now, "examples_per_seed": n_now,
                    "mde": stats.mde(acc, n_now, s_now, seed_sd=sd) if n_now else None, **as_written},
            "assumed": {"accuracy": acc, "seed_sd": sd,
                        "source": rec["source"] if rec else "no records of this study here: accuracy taken at 50% "
                        "(the largest binomial variance), the seeds' own spread at 0 (more seeds than planned may "
                        "be needed once it is measured)"},
            "cost": cost, "slots": slots, "validation_examples": avail, "options": options,
            "epochs": study.train.optim.epochs}


def _predicted(study: Study, cost: dict[str, Any], seeds: int, examples: int, slots: int) -> dict[str, Any]:
    """Trials, wall time and evaluation's share of it for ``seeds`` x ``examples``: one trial per row
    and seed for an ablation (its rows probed one by one), else the sweep's trials, each charged the
    most expensive configuration."""
    per_row = cost.get("rows") if study.kind == "ablation" else None
    per_row = per_row or [cost] * (len(_rows(study)) if study.kind == "ablation" else study.search.num_samples)
    train = sum(study.train.optim.epochs * r["epoch_s"] for r in per_row)
    evaluation = sum(examples * r["eval_s_per_example"] for r in per_row)
    total = train + evaluation + len(per_row) * TRIAL_OVERHEAD_S
    return {"trials": len(per_row) * seeds, "predicted_wall_s": seeds * total / slots,
            "predicted_eval_share": evaluation / total}


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def format_plan(p: dict[str, Any]) -> str:
    now = p["now"]
    lines = [f"study {p['study']} ({p['kind']}): resolve a difference of {100 * p['detect']:.1f} points between two "
             "rows (two-sided 5%, 80% power)",
             f"  assumed: worst-case accuracy near {100 * p['assumed']['accuracy']:.0f}%, seeds' own spread "
             f"{100 * p['assumed']['seed_sd']:.1f} points: {p['assumed']['source']}",
             f"  as written ({now['seeds']} seed(s) x {now['examples_per_seed'] or '?'} examples): resolves "
             + (f"{100 * now['mde']:.1f} points" if now["mde"] is not None else
                "? (the dataset is not readable here)")
             + (f"; {now['trials']} trials, about {_duration(now['predicted_wall_s'])} of wall time here"
                if "predicted_wall_s" in now else "")]
    if p["cost"]:
        c = p["cost"]
        rows = c.get("rows") if p["kind"] == "ablation" else None
        each = (f"{min(r['epoch_s'] for r in rows):.0f}-{max(r['epoch_s'] for r in rows):.0f} s per epoch, "
                f"{min(r['eval_s_per_example'] for r in rows):.2f}-{max(r['eval_s_per_example'] for r in rows):.2f} s "
                "per evaluated example by row" if rows else
                f"{c['epoch_s']:.1f} s per epoch, {c['eval_s_per_example']:.2f} s per evaluated example")
        lines.append(f"  cost: {each}, {p['slots']} trial(s) at once here; from {c['source']}")
    for o in p["options"]:
        if o["examples_per_seed"] is None:
            lines.append(f"  {o['seeds']} seeds: no number of examples resolves it (the seeds' own spread is too "
                         "large): add seeds")
            continue
        fit = ""
        if o["fits_validation_split"] is False:
            fit = f"  (more than the {p['validation_examples']} validation examples: raise data.val_size)"
        cost = ""
        if "predicted_wall_s" in o:
            cost = (f"; {o['trials']} trials, about {_duration(o['predicted_wall_s'])} of wall time here "
                    f"({100 * o['predicted_eval_share']:.0f}% of it evaluation)")
        lines.append(f"  {o['seeds']} seeds: {o['examples_per_seed']} examples per seed ({o['examples_per_row']} per "
                     f"row){cost}{fit}")
    lines.append("  set them in the study file: seeds: [...], evaluation: {n_examples: N}, train.data.val_size")
    return "\n".join(lines)
