"""The sweep's searcher without Ray running: what Optuna sees, its pinned settings, its journal, and
a finite space never sampled twice at one point until it is exhausted."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from trainables.search import JOURNAL_NAME, build_searcher, finite_points, nsga2_population, optuna_sampler
from trainables.study import load_study

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, space: str, num_samples: int = 8, extra: str = ""):
    text = (ROOT / "search_spaces" / "quickstart.yaml").read_text()
    head, rest = text.split("  space:\n", 1)
    tail = rest[rest.index("scheduler:"):]
    text = head.replace("num_samples: 12", f"num_samples: {num_samples}") + "  space:\n" + space + extra + tail
    f = tmp_path / "s.yaml"
    f.write_text(text.replace("base: quickstart ", f"base: {ROOT / 'ancra_tune/presets/quickstart.yaml'} "))
    return load_study(f)


TWO_BY_TWO = "    method.anc: [true, false]\n    model.ra: [true, false]\n"


def test_optuna_sees_every_epoch_and_keeps_its_study_in_the_study_folder(tmp_path: Path) -> None:
    study = _study(tmp_path, "    method.alpha: {low: 0.0, high: 1.0}\n")
    searcher = build_searcher(study, concurrent=2, study_dir=str(tmp_path / "study"))
    assert searcher.suggest("a") == {"method.alpha": study.default_point()["method.alpha"]}  # defaults first
    searcher.suggest("b")
    for epoch, value in ((1, 0.30), (2, 0.35)):
        searcher.on_trial_result("a", {"epoch": epoch, "val_robust_acc": value, "epoch_time_s": 1.0})
    searcher.on_trial_result("a", {"epoch": 2, "val_robust_acc": 0.35, "epoch_time_s": 1.0})  # a restart's repeat
    searcher.on_trial_result("b", {"epoch": 1, "val_robust_acc": 0.10, "epoch_time_s": 1.0})
    searcher.on_trial_complete("a", {"objective.robust_acc_worst": 0.31, "final": 1})
    searcher.on_trial_complete("b", {"epoch": 1, "val_robust_acc": 0.10})  # stopped by ASHA: no objective
    st = optuna.load_study(study_name=study.name, storage=searcher._storage)  # read back from the journal file
    assert (tmp_path / "study" / JOURNAL_NAME).is_file()
    a, b = st.trials
    assert a.state == optuna.trial.TrialState.COMPLETE and a.value == pytest.approx(0.31)
    assert a.intermediate_values == {1: 0.30, 2: 0.35}
    assert b.state == optuna.trial.TrialState.PRUNED and b.intermediate_values == {1: 0.10}
    # --more: a new searcher on the same journal sees both trials and does not queue the defaults again
    again = build_searcher(study, study_dir=str(tmp_path / "study"))
    again.suggest("c")
    assert len(optuna.load_study(study_name=study.name, storage=again._storage).trials) == 3
    assert not again._points_to_evaluate


def test_sampler_settings_are_pinned(tmp_path: Path) -> None:
    study = _study(tmp_path, TWO_BY_TWO, num_samples=32)
    tpe = optuna_sampler(study, concurrent=2)
    assert tpe._multivariate and tpe._group and tpe._constant_liar and tpe._n_startup_trials == 8
    assert not optuna_sampler(study, concurrent=1)._constant_liar
    assert nsga2_population(32) == 8 and nsga2_population(8) == 4 and nsga2_population(1000) == 50


def test_a_finite_space_is_not_sampled_twice_until_it_is_exhausted(tmp_path: Path) -> None:
    study = _study(tmp_path, TWO_BY_TWO, num_samples=5)
    assert sorted(map(str, finite_points(study))) == sorted(map(str, [
        {"method.anc": a, "model.ra": r} for a in (True, False) for r in (True, False)]))
    searcher = build_searcher(study, study_dir=str(tmp_path / "study"))
    seen = []
    for i in range(4):
        seen.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"objective.robust_acc_worst": 0.1 * i})
    assert len({str(sorted(c.items())) for c in seen}) == 4 and not searcher.exhausted
    searcher.suggest("t4")  # all four tried: the fifth repeats one, and the study says so
    assert searcher.exhausted
    # a space with an integer dimension is finite too; one with a float dimension is not
    cond = _study(tmp_path, "    method.anc: [true, false]\n    method.beta: {low: 1, high: 3, int: true}\n")
    assert len(finite_points(cond)) == 6
    assert finite_points(_study(tmp_path, "    method.alpha: {low: 0.0, high: 1.0}\n")) is None


MORE = """
name: more_sweep
kind: sweep
base: quickstart
train: {optim.epochs: 1, data.train_limit: 128, attack.steps: 2, eval.pgd_steps: 2, eval.max_examples: 32}
resources: {workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}
eval: {preset: quick, n_examples: 32, autoattack: null, square_queries: 10, check_examples: 32}
search:
  num_samples: 2
  space: {method.anc: [true, false], model.ra: [true, false]}
scheduler: {type: none}
seeds: [0]
"""


@pytest.mark.slow
@pytest.mark.ray
def test_more_adds_trials_to_a_finished_sweep_with_every_earlier_one_in_view(ray_local, tmp_path: Path) -> None:
    """A 2 x 2 space, 2 trials, then --more 2: four trials at four different points, in one summary and
    under one MLflow study run; the Optuna journal holds all four; --resume of the finished study gives
    the same four again."""
    from trainables.cli.study_commands import _without_more
    from trainables.study_run import run_study

    f = tmp_path / "more.yaml"
    f.write_text(MORE)
    study = load_study(f)
    storage, uri = str(tmp_path / "studies"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_study(study, storage=storage, tracking_uri=uri)
    assert first["n_trials"] == 2 and first["outcome"] == "finished"
    more = run_study(study, storage=storage, tracking_uri=uri, more=2)
    assert more["n_trials"] == 4 and more["status_counts"]["finished"] == 4 and more["outcome"] == "finished"
    points = {(t["params"]["method.anc"], t["params"]["model.ra"]) for t in more["trials"]}
    assert len(points) == 4  # the sampler saw the first two: no point twice
    assert more["mlflow"]["study_run_id"] == first["mlflow"]["study_run_id"]
    from trainables.tracking import client

    mc = client(uri)
    children = mc.search_runs([mc.get_experiment_by_name(study.name).experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{first['mlflow']['study_run_id']}'")
    assert len(children) == 4
    st = optuna.load_study(study_name=study.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "studies" / study.name / JOURNAL_NAME))))
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    again = run_study(study, storage=storage, tracking_uri=uri, resume=True)
    assert again["n_trials"] == 4
    assert {t["trial_id"] for t in again["trials"]} == {t["trial_id"] for t in more["trials"]}
    with pytest.raises(ValueError, match="one of them"):
        run_study(study, storage=storage, tracking_uri=uri, more=1, resume=True)
    assert _without_more(["sweep", "f.yaml", "--more", "2", "--json"]) == ["sweep", "f.yaml", "--json"]
    assert _without_more(["ablate", "f.yaml", "--from-record", "r", "--carry=c", "--num-cpus", "1"]) == \
        ["ablate", "f.yaml", "--num-cpus", "1"]
