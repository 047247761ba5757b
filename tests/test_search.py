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
