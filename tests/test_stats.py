"""The statistics behind every table: known values, and pages that claim only what their tests support."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ancra_tune.robustness import stats


def test_intervals_and_tests_match_known_values() -> None:
    # Wilson 95% for 50/100 and the exact (Clopper-Pearson) interval for 0/10, as in the textbooks.
    lo, hi = stats.proportion_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert stats.proportion_ci(0, 10, "exact") == pytest.approx((0.0, 0.3085), abs=1e-4)
    # Exact McNemar: 10 discordant pairs all one way: p = 2 * 0.5^10.
    base = np.zeros((1, 40), dtype=bool)
    row = base.copy()
    row[0, :10] = True
    c = stats.compare(row, base)
    assert c.discordant == (10, 0) and c.p == pytest.approx(2 * 0.5 ** 10) and c.diff == pytest.approx(0.25)
    # Holm on three p-values.
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # Power: two rows of 2 x 100 examples near 50% resolve (1.96 + 0.84) * sqrt(2 * .25 / 200) = 14 points.
    assert stats.mde(0.5, 100, 2) == pytest.approx(0.1401, abs=1e-3)
    n = stats.examples_needed(0.03, 0.5, 3)
    assert n == 1454 and stats.mde(0.5, n, 3) <= 0.03 < stats.mde(0.5, n - 1, 3)
    assert stats.examples_needed(0.03, 0.5, 3, seed_sd=0.05) is None  # the seeds' spread alone is too large


def test_outcomes_pack_small_and_come_back() -> None:
    bits = np.random.default_rng(1).random(203) < 0.3
    text = stats.pack(bits)
    assert len(text) == 36 and (stats.unpack(text, 203) == bits).all()
    with pytest.raises(ValueError):
        stats.unpack(text, 300)


def test_an_interval_over_seeds_is_never_narrower_than_the_pooled_binomial() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 500)) < 0.4
    e = stats.estimate(x)
    wlo, whi = stats.proportion_ci(int(x.sum()), x.size)
    assert e.ci95[0] <= wlo and e.ci95[1] >= whi and e.n == 500 and e.seeds == 3
    assert e.mean == pytest.approx(x.mean()) and len(e.per_seed) == 3
    # Seeds that disagree far beyond sampling widen it.
    y = np.vstack([rng.random(500) < 0.2, rng.random(500) < 0.4, rng.random(500) < 0.6])
    assert stats.estimate(y).ci95[1] - stats.estimate(y).ci95[0] > 2 * (whi - wlo)


def _synthetic_ablation(rng: np.random.Generator) -> tuple[list[dict], dict]:
    """A 3-row ablation on 3 seeds x 2000 shared examples: 'better' is right on 6 points more examples
    than the baseline by construction, 'same' is the baseline's model class again."""
    from ancra_tune.robustness import EvalReport
    from ancra_tune.robustness.report import AttackResult
    from ancra_tune.robustness.suite import SuiteConfig

    n = 2000
    hard = rng.random(n)  # each example's difficulty, shared by every model (paired)
    trials, reports = [], {}
    for arm, shift in (("baseline", 0.0), ("better", 0.06), ("same", 0.0)):
        for seed in range(3):
            noise = rng.random(n) < 0.05
            worst = (hard < 0.40 + shift) ^ noise
            clean = worst | (hard < 0.6)
            tid = f"{arm}{seed}"
            pgd = worst.tolist()
            reports[tid] = EvalReport(
                suite=SuiteConfig.preset_config("quick", eps=0.1), n_examples=n, ra=False, n_classes=10,
                clean_acc=float(clean.mean()), robust_acc_worst=float(worst.mean()),
                attacks=(AttackResult("pgd20_final", "pgd", "final", 20, 0.1, True, float(worst.mean())),),
                checks=(), per_example={"clean": clean.tolist(), "worst": worst.tolist(), "pgd20_final": pgd})
            trials.append({"trial_id": tid, "status": "finished", "params": {"arm": arm, "seed": seed}})
    return trials, reports


def test_a_page_claims_the_arm_better_by_construction_and_not_the_equal_one() -> None:
    from trainables import ablation_table

    trials, reports = _synthetic_ablation(np.random.default_rng(7))
    table = ablation_table.build(trials, reports, ["arm"])
    assert table["baseline"] == {"arm": "baseline"}
    worst = {c["row"]["arm"]: c for c in table["comparisons"] if c["metric"] == "worst"}
    assert worst["better"]["diff"] == pytest.approx(0.06, abs=0.015)
    assert worst["better"]["p_holm"] < 0.05 and worst["better"]["verdict"].startswith("higher")
    assert worst["better"]["ci95"][0] > 0 and "McNemar" in worst["better"]["test"]
    assert worst["same"]["p_holm"] >= 0.05 and worst["same"]["verdict"].startswith("no difference resolvable")
    lo, hi = worst["same"]["ci95"]
    assert lo < 0 < hi
    # p_holm is Holm over every comparison of the page
    ps = [c["p"] for c in table["comparisons"]]
    assert [c["p_holm"] for c in table["comparisons"]] == pytest.approx(stats.holm(ps))
    row = next(r for r in table["rows"] if r["config"] == {"arm": "better"})
    assert row["worst"]["n"] == 2000 and row["worst"]["seeds"] == 3 and len(row["worst"]["per_seed"]) == 3
    assert row["worst"]["ci95"][0] < row["worst"]["mean"] < row["worst"]["ci95"][1]
    assert 0 < table["mde"] < 0.05 and table["mde_inputs"]["n"] == 2000
    text = "\n".join(ablation_table.markdown(table))
    assert "arm=better | worst case | 2,000 x 3 | +" in text and "higher by" in text and "points**" in text
    same_line = next(line for line in text.splitlines() if line.startswith("| arm=same | worst case"))
    assert "higher" not in same_line and "lower" not in same_line


def test_a_winner_within_noise_of_the_runner_up_is_said_to_be(tmp_path) -> None:
    from trainables.selection import margin

    trials, reports = _synthetic_ablation(np.random.default_rng(3))
    close = margin(("same0", reports["same0"]), ("baseline0", reports["baseline0"]), "robust_acc_worst")
    apart = margin(("better0", reports["better0"]), ("baseline0", reports["baseline0"]), "robust_acc_worst")
    assert close is not None and apart is not None
    assert apart["separable"] and apart["examples_won"] > apart["examples_lost"] and "separable." in apart["text"]
    assert not close["separable"] and "not separable" in close["text"]
    assert math.isclose(apart["diff"], (apart["examples_won"] - apart["examples_lost"]) / 2000)


def test_plan_sizes_a_study_from_its_own_records(tmp_path) -> None:
    """`ancra-tune plan`: examples x seeds for the difference asked, the cost from the study's records."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from trainables.plan import make_plan
    from trainables.study import load_study

    study = load_study(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml")
    trials = [{"trial_id": f"t_{seed}", "status": "finished", "params": {"method.alpha": 0.5, "seed": seed},
               "robust_acc_worst": acc, "eval_n_examples": 200, "eval_time_s": 100.0, "time_per_epoch_s": 12.0}
              for seed, acc in enumerate((0.30, 0.34, 0.32))]
    folder = tmp_path / study.name
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"trials": trials}))
    plan = make_plan(study, 0.03, storage=str(tmp_path), measure=False, available=10_000)
    assert plan["assumed"]["accuracy"] == pytest.approx(0.32) and "own records" in plan["assumed"]["source"]
    sd = plan["assumed"]["seed_sd"]
    assert sd == pytest.approx(stats.seed_spread([0.30, 0.34, 0.32], 200))
    by_seeds = {o["seeds"]: o for o in plan["options"]}
    three = by_seeds[3]
    assert three["examples_per_seed"] == stats.examples_needed(0.03, 0.32, 3, seed_sd=sd)
    assert stats.mde(0.32, three["examples_per_seed"], 3, seed_sd=sd) <= 0.03
    per_trial = study.train.optim.epochs * 12.0 + three["examples_per_seed"] * 0.5 + 13.0
    assert three["trials"] == study.search.num_samples * 3
    assert three["predicted_wall_s"] == pytest.approx(three["trials"] * per_trial / plan["slots"])
    assert plan["now"]["mde"] > 0.03  # as written (a few hundred examples) it cannot resolve 3 points
    # the command prints the same plan as JSON on stdout, and refuses a nonsense difference
    out = subprocess.run([sys.executable, "-m", "trainables.cli", "plan", str(study.path), "--storage",
                          str(tmp_path), "--json", "--no-probe"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [o["seeds"] for o in json.loads(out.stdout)["options"]] == [1, 3, 5]  # the study's, 3 and 5
    bad = subprocess.run([sys.executable, "-m", "trainables.cli", "plan", str(study.path), "--detect", "3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--detect 3" in bad.stderr


@pytest.mark.parametrize(("cpus_per_worker", "threads"), [(0.5, 1), (2.0, 2)])
def test_the_plans_probe_runs_with_the_threads_a_trials_worker_gets(monkeypatch, cpus_per_worker, threads) -> None:
    """Trials that share the cores each get their worker's threads; a probe with every core would
    be as fast as one trial alone, and the plan divides by the trials at once: cores counted twice."""
    import dataclasses
    from pathlib import Path

    import torch

    from trainables import plan
    from trainables.study import load_study

    study = load_study(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml")
    study = dataclasses.replace(study, resources=dataclasses.replace(study.resources, cpus_per_worker=cpus_per_worker))
    seen: list[int] = []

    def fake_probe(s, *, progress, survive):
        seen.append(torch.get_num_threads())
        return {"source": "a probe", "epoch_s": 1.0, "eval_s_per_example": 0.1}

    monkeypatch.setattr(plan, "_probe", fake_probe)
    outside = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cost = plan.probe(study, progress=False)
        assert seen == [threads] and torch.get_num_threads() == 3  # measured with the worker's, then restored
    finally:
        torch.set_num_threads(outside)
    assert f"{threads} thread(s) as each trial's worker gets" in cost["source"]


def test_an_ablations_plan_adds_its_rows_own_costs(tmp_path, monkeypatch) -> None:
    """An ablation runs each row once per seed: the plan adds the rows' probed costs (a sweep, whose
    trials are not known beforehand, is charged its most expensive configuration)."""
    from pathlib import Path

    from trainables import plan
    from trainables.study import load_study

    study = load_study(Path(__file__).parents[1] / "search_spaces" / "table8_mnist.yaml")
    rows = [{"epoch_s": 1000.0, "eval_s_per_example": 0.3}, {"epoch_s": 1000.0, "eval_s_per_example": 0.6},
            {"epoch_s": 2000.0, "eval_s_per_example": 0.3}, {"epoch_s": 2000.0, "eval_s_per_example": 0.7}]
    monkeypatch.setattr(plan, "probe", lambda s, **kw: {"source": "a probe", "epoch_s": 2000.0,
                                                        "eval_s_per_example": 0.7, "rows": rows})
    p = plan.make_plan(study, 0.03, storage=str(tmp_path), available=10_000)
    three = {o["seeds"]: o for o in p["options"]}[3]
    need, epochs = three["examples_per_seed"], study.train.optim.epochs
    train = epochs * 6000.0
    evaluation = need * 1.9
    assert three["trials"] == 12
    assert three["predicted_wall_s"] == pytest.approx(3 * (train + evaluation + 4 * plan.TRIAL_OVERHEAD_S) / p["slots"])
    assert three["predicted_wall_s"] < 12 * (epochs * 2000.0 + need * 0.7) / p["slots"]  # not every row the dearest
    assert "1000-2000 s per epoch, 0.30-0.70 s per evaluated example by row" in plan.format_plan(p)
    written, n = p["now"], study.suite.n_examples  # as written: 3 seeds x 1,667 examples
    expected = 3 * (train + n * 1.9 + 4 * plan.TRIAL_OVERHEAD_S) / p["slots"]
    assert written["predicted_wall_s"] == pytest.approx(expected)
    assert f"as written (3 seed(s) x {n} examples): resolves {100 * written['mde']:.1f} points; 12 trials, about" \
        in plan.format_plan(p)


def test_report_json_keeps_every_outcome_packed(tmp_path) -> None:
    import json

    trials, reports = _synthetic_ablation(np.random.default_rng(0))
    r = reports["better1"]
    path = r.save(tmp_path / "report.json")
    stored = json.loads(path.read_text())["per_example"]
    assert stored["encoding"] == stats.PACKING and stored["n"] == 2000
    assert set(stored["outcomes"]) == {"clean", "worst", "pgd20_final"}
    assert all(len(v) <= 4 * (2000 // 8 + 3) // 3 for v in stored["outcomes"].values())  # 2000 bits in ~336 chars
    back = type(r).load(path)
    assert back.per_example == r.per_example and back.outcomes("worst") == r.outcomes("worst")


def test_the_plans_probe_charges_a_surviving_example_every_attacks_whole_budget() -> None:
    """A robust model's surviving examples cost every attack's whole budget (a barely trained model is
    fooled at once, and the plan once took its cost for every example: ten times too cheap on MNIST):
    the probe times correctly classified examples at a vanishing eps, where Square spends all its
    queries, and charges the assumed accuracy's share of examples that cost."""
    from helpers import digits_splits, trained_digits_model

    from ancra_tune.robustness import SuiteConfig
    from trainables import plan

    model, s = trained_digits_model(ra=False), digits_splits()
    x, y = s.val.images.float().div(255.0), s.val.labels
    keep = plan.survivors(model, x, y, 4)
    assert keep.numel() == 4 and bool((model(x[keep]).logits.argmax(1) == y[keep]).all())
    suite = SuiteConfig(eps=0.1, pgd_steps=1, cw_steps=1, mim_steps=1, sweep_steps=1, apgd_iters=1, square_queries=300,
                        square_queries_suspicious=300, autoattack=None, features=False)
    _, survivor_rows = plan.eval_cost(model, x[keep], y[keep], dataclasses.replace(suite, eps=plan.SURVIVOR_EPS))
    _, fooled_rows = plan.eval_cost(model, x[keep], y[keep], dataclasses.replace(suite, eps=1.0))
    assert survivor_rows >= 300  # Square's every query, on every example
    assert fooled_rows < 100  # fooled at once: Square stops at its first queries


def test_a_page_published_before_its_study_ended_names_the_runs_no_cell_counts() -> None:
    """Only finished runs are in the cells: the page says how many of the study file's runs that is,
    and names each one that is not (not started, interrupted, diverged, failed), by row and seed."""
    from trainables import ablation_table
    from trainables.study_page import runs_line

    trials, reports = _synthetic_ablation(np.random.default_rng(3))
    trials = [t for t in trials if t["trial_id"] not in ("same2", "better1")]  # never started
    trials[0] = {**trials[0], "status": "interrupted"}  # baseline seed 0
    reports.pop("baseline0")
    points, seeds = [{"arm": a} for a in ("baseline", "better", "same")], [0, 1, 2]
    (text, blank) = runs_line({"trials": trials}, points, seeds)
    assert blank == "" and text.startswith("**Runs.** The study file asks for 3 configurations x 3 seeds = 9 runs; "
                                           "6 finished, and only they are in the cells below.")
    assert text.endswith("Not finished, so in no cell: arm=baseline seed 0 (interrupted); arm=better seed 1 "
                         "(not started); arm=same seed 2 (not started).")
    table = ablation_table.build(trials, reports, ["arm"], points=points, seeds=seeds)
    rows = {r["config"]["arm"]: r for r in table["rows"]}
    assert [rows[a]["worst"]["seeds"] for a in ("baseline", "better", "same")] == [2, 2, 2]
    md = "\n".join(ablation_table.markdown(table))
    assert "| arm=baseline | 2/3 | 2000 |" in md and "| arm=same | 2/3 | 2000 |" in md
    # Paired against the baseline on the seeds both rows have: seed 2 for better, seed 1 for same.
    worst = {c["row"]["arm"]: c for c in table["comparisons"] if c["metric"] == "worst"}
    assert worst["better"]["seeds"] == 1 and worst["same"]["seeds"] == 1
    assert "| arm=better | worst case | 2,000 x 1 | " in md  # the page says what each comparison stands on
    assert runs_line({"trials": trials}, None, seeds) == []


def test_a_difference_the_seeds_disagree_on_is_said_to_be_these_models_only() -> None:
    """McNemar pools the seeds' examples, so three models that move by +12, +5 and -3 points give a
    tiny p; the two-way interval resamples the seeds too and holds 0. The page may then say
    "higher" only of these seeds' models, with that interval; a difference every seed shares is
    said plainly."""
    rng = np.random.default_rng(1)
    hard = rng.random((3, 2000))
    base = hard < 0.5
    split = np.stack([hard[i] < 0.5 + d for i, d in enumerate((0.12, 0.05, -0.03))])
    c = stats.compare(split, base)
    assert c.p < 1e-20 and c.ci95[0] < 0 < c.ci95[1]
    said = stats.verdict(c)
    assert said.startswith(f"higher by {100 * c.diff:.1f} points") and "not across seeds" in said
    assert f"[{100 * c.ci95[0]:+.1f}, {100 * c.ci95[1]:+.1f}], holds 0" in said
    shared = np.stack([hard[i] < 0.55 for i in range(3)])
    c = stats.compare(shared, base)
    assert c.ci95[0] > 0 and stats.verdict(c) == f"higher by {100 * c.diff:.1f} points (p = {c.p:.2g})"
