"""Study files: validation, the conditional space, resources, summaries (no Ray needed)."""

from pathlib import Path

import optuna
import pytest

from trainables.ray_session import InfeasibleResourcesError, check_resources
from trainables.study import StudyError, load_study
from trainables.summary import pareto_front

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


@pytest.mark.parametrize("name", ["quickstart", "paper_cifar10_resnet18", "hparams", "negatives", "components"])
def test_shipped_studies_load(name: str) -> None:
    s = load_study(SPACES / f"{name}.yaml")
    assert s.name == name
    if s.kind == "ablation":
        assert s.grid_points() and len(s.seeds) >= 3


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_and_its_smoke_test_build_their_scheduler(path: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`--smoke-test` trains one epoch: ASHA's grace period follows it (a grace period of 2 made Tune
    fail with an assertion before the first trial)."""
    from trainables.search import build_scheduler, smoke_study

    monkeypatch.chdir(ROOT)
    study = load_study(path)
    for s in (study, smoke_study(study)):
        scheduler = build_scheduler(s, storage=str(tmp_path), resume=False)
        assert (scheduler is None) == (s.scheduler.type != "asha")
        assert s.scheduler.grace_period <= s.train_config({}, s.seeds[0]).optim.epochs
    assert smoke_study(study).train.optim.epochs == 1 and smoke_study(study).search.num_samples <= 2


def test_table8_study_is_trades_x_anc_x_ra_on_the_shared_cifar10(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # its data path is relative to the folder the command runs in
    s = load_study(SPACES / "table8_cifar10_cpu.yaml")
    assert {(p["method.anc"], p["model.ra"]) for p in s.grid_points()} == {(a, r) for a in (False, True)
                                                                          for r in (False, True)}
    assert s.train.method.base_loss == "trades" and len(s.seeds) >= 2 and s.suite.preset == "full"
    assert s.train.data.train_file == str((ROOT.parent / "shared/data/cifar10/train10000.npz").resolve())


def test_relative_data_files_are_read_from_the_working_folder(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write(tmp_path, "train: {data.dataset: npz, data.train_file: d/train.npz, data.test_file: /abs/t.npz}\n")
    monkeypatch.chdir(tmp_path / "..")
    s = load_study(f)  # Ray's workers run in other folders: the study hands them absolute paths
    assert s.train.data.train_file == str((tmp_path / ".." / "d/train.npz").resolve())
    assert s.train.data.test_file == "/abs/t.npz"


def test_components_and_negatives_are_the_papers_tables() -> None:
    comp = load_study(SPACES / "components.yaml")
    assert len(comp.grid_points()) == 3 * 2 * 2  # base loss x ANC x RA (Table VIII)
    neg = load_study(SPACES / "negatives.yaml")
    assert {p["method.negatives"] for p in neg.grid_points()} == {"random", "soft", "hard"}
    assert {p["method.targeted"] for p in neg.grid_points()} == {False, True}  # Table IX


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "study.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize(("text", "words"), [
    ("kind: sweeep\n", ["kind", "sweeep", "sweep, ablation"]),
    ("resourcez: {}\n", ["top level", "resourcez", "resources"]),
    ("resources: {gpus: 1}\n", ["resources", "gpus", "gpus_per_worker"]),
    ("resources: {trial_cpus: 0}\n", ["resources.trial_cpus", "> 0"]),
    ("train: {method.alpha: 2}\n", ["train", "method.alpha", "[0, 1]"]),
    ("search: {space: {method.alhpa: {low: 0, high: 1}}}\n", ["search.space.method.alhpa", "method.alpha"]),
    ("search: {space: {method.zeta: {low: 2, high: 1}}}\n", ["search.space.method.zeta", "low < high"]),
    ("search: {sampler: cmaes}\n", ["search.sampler", "tpe, nsga2, random"]),
    ("objective: {metric: robust_acc_worst, mode: maximize}\n", ["objective.mode", "max, min"]),
    ("objective: {metric: robust_acc}\n", ["objective.metric", "robust_acc", "robust_acc_worst", "acc_pgd10_final"]),
    # The evaluation and the scheduler are validated at load, never after a trial has trained.
    ("eval: {eps: 8/255, pgd_stpes: 3}\n", ["eval", "pgd_stpes", "pgd_steps"]),
    ("eval: {eps: -1}\n", ["eval.eps", "> 0"]),
    ("eval: {preset: fast}\n", ["eval.preset", "full, quick"]),
    ("eval: {autoattack: 'apgd-ce,square2'}\n", ["eval.autoattack", "square2"]),
    ("scheduler: {grace_period: 0}\n", ["scheduler.grace_period", ">= 1"]),
    ("scheduler: {grace: 2}\n", ["scheduler", "grace", "grace_period"]),
    ("scheduler: {metric: robust_acc_worst}\n", ["scheduler.metric", "per-epoch validation metric"]),
    # A misspelled metric used to run with ASHA silently off (no result ever carried it).
    ("scheduler: {metric: val_robust_ac}\n", ["scheduler.metric", "'val_robust_ac'", "val_robust_acc",
                                               "val_pgd_acc_softgate"]),
    ("scheduler: {reduction_factor: two}\n", ["scheduler.reduction_factor", "integer"]),
    ("train: {optim.epochs: 2}\nscheduler: {grace_period: 3}\n", ["scheduler.grace_period", "= 3", "2 epoch(s)"]),
    # Trials are scored on a validation split, never on test.
    ("train: {data.val_size: 0}\n", ["train.data.val_size", "validation split"]),
    ("train: {eval.split: test}\n", ["train.eval.split", "never on test"]),
    ("kind: ablation\n", ["ablation.grid"]),
    ("kind: ablation\nablation: {grid: {method.negatives: [random, nearest]}}\n", ["method.negatives", "nearest"]),
    ("resources: {workers: 3}\ntrain: {data.batch_size: 128}\n", ["resources.workers", "divisible"]),
])
def test_bad_study_names_file_key_and_allowed(tmp_path: Path, text: str, words: list[str]) -> None:
    f = _write(tmp_path, text)
    with pytest.raises(StudyError) as e:
        load_study(f)
    assert str(f) in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_eval_section_is_a_typed_suite(tmp_path: Path) -> None:
    from ancra_tune.robustness import SuiteConfig

    s = load_study(_write(tmp_path, "base: quickstart\neval: {preset: quick, eps: 8/255, n_examples: 64}\n"))
    assert isinstance(s.suite, SuiteConfig) and s.suite.preset == "quick"
    assert s.suite.eps == pytest.approx(8 / 255) and s.suite.n_examples == 64
    # Without an eps, the evaluation budget is the trials' training budget.
    assert load_study(SPACES / "quickstart.yaml").suite.eps == load_study(SPACES / "quickstart.yaml").train.attack.eps
    assert SuiteConfig.from_mapping(s.suite.to_dict()) == s.suite  # what travels to the Ray workers


def test_conditional_space_define_by_run() -> None:
    s = load_study(SPACES / "quickstart.yaml")
    assert s.default_point() == {"method.base_loss": "trades", "method.anc": True, "method.alpha": 1.0,
                                 "method.zeta": 3.0, "model.ra": True, "method.gamma": 2.0}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_anc = set()
    for _ in range(40):
        trial = study.ask()
        point = s.sample(trial)
        assert point == trial.params
        assert s.is_valid_point(point)
        assert ("method.alpha" in point) == point["method.anc"] == ("method.zeta" in point)
        assert ("method.gamma" in point) == point["model.ra"]
        seen_anc.add(point["method.anc"])
        study.tell(trial, 0.0)
    assert seen_anc == {True, False}
    assert not s.is_valid_point({"method.base_loss": "pgd_at", "method.anc": False, "method.alpha": 0.5,
                                 "model.ra": False})
    cfg = s.train_config({"method.anc": False, "model.ra": False}, seed=3)
    assert (cfg.method.anc, cfg.model.ra, cfg.seed, cfg.data.dataset) == (False, False, 3, "digits")


def test_infeasible_resources_fail_with_what_was_asked(tmp_path: Path) -> None:
    s = load_study(_write(tmp_path, "resources: {workers: 2, cpus_per_worker: 4, trial_cpus: 1}\n"
                                    "train: {data.batch_size: 64}\n"))
    with pytest.raises(InfeasibleResourcesError) as e:
        check_resources(s, [{"CPU": 2.0}])
    msg = str(e.value)
    assert "2 worker(s) x (4 CPU, 0 GPU)" in msg and "9 CPU" in msg and "node 0: 2 CPU" in msg
    gpu = load_study(_write(tmp_path, "resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 1}\n"))
    with pytest.raises(InfeasibleResourcesError, match="0 GPU"):
        check_resources(gpu, [{"CPU": 16.0}])
    # A 2-CPU laptop runs 1.5-CPU trials one at a time; a GPU cluster fits one trial per GPU.
    assert check_resources(load_study(SPACES / "quickstart.yaml"), [{"CPU": 2.0}]) == 2  # two trials at once
    assert check_resources(load_study(SPACES / "negatives.yaml"), [{"CPU": 8, "GPU": 1}] * 4) == 4
    assert check_resources(load_study(SPACES / "hparams.yaml"), [{"CPU": 48, "GPU": 4}]) == 8


def test_ablation_table_rows_are_configurations() -> None:
    """Without reports (none kept), rows are still the grid's configurations in order, empty cells."""
    from trainables.ablation_table import build

    s = load_study(SPACES / "components.yaml")
    rows = [{"trial_id": f"t{i}{seed}", "params": {**point, "seed": seed}, "status": "finished",
             "time_per_epoch_s": 10.0}
            for i, point in enumerate(s.grid_points()) for seed in s.seeds]
    table = build(rows, {}, list(s.ablation.grid), points=s.grid_points())
    assert len(table["rows"]) == 12 and [r["config"] for r in table["rows"]] == s.grid_points()
    r = table["rows"][0]
    assert r["trials"] == 3 and r["worst"] is None and r["time_per_epoch_s"] == 10.0
    assert table["comparisons"] == [] and table["mde"] is None and table["baseline"] == s.grid_points()[0]


def test_pareto_front() -> None:
    rows = [{"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.4}, {"a": 0.1, "b": 0.9}]
    front = pareto_front(rows, ["a", "b"], ["max", "max"])
    assert front == [rows[0], rows[1], rows[3]]


def test_multi_objective_uses_nsga2_and_no_asha(tmp_path: Path) -> None:
    from trainables.search import FinalObjectiveOptunaSearch, build_scheduler, build_searcher

    f = _write(tmp_path, "base: quickstart\nobjective: {metrics: [clean_acc, robust_acc_worst], modes: [max, max]}\n"
                         "search: {space: {method.zeta: {low: 1, high: 4}}}\n")
    s = load_study(f)
    assert s.objective.multi and s.search.sampler == "nsga2" and s.scheduler.type == "none"
    searcher = build_searcher(s)
    assert isinstance(searcher, FinalObjectiveOptunaSearch)
    # The searcher reads each metric's credible value (never a masked one).
    assert searcher.metric == ["objective.clean_acc", "objective.robust_acc_worst"]
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    assert build_scheduler(s) is None
    with pytest.raises(StudyError, match="ASHA needs a single objective"):
        load_study(_write(tmp_path, "objective: {metrics: [clean_acc, robust_acc_worst]}\nscheduler: {type: asha}\n"))


def test_the_end_of_trial_suite_is_named_evaluation_and_eval_still_reads(tmp_path) -> None:
    text = (SPACES / "quickstart.yaml").read_text().replace(
        "base: quickstart ", f"base: {SPACES.parent / 'ancra_tune/presets/quickstart.yaml'} ")
    assert "\nevaluation:" in text
    f = tmp_path / "s.yaml"
    f.write_text(text.replace("\nevaluation:", "\neval:"))  # the older name
    assert load_study(f).suite.n_examples == 128
    f.write_text(text + "eval: {n_examples: 64}\n")
    with pytest.raises(StudyError, match="given twice"):
        load_study(f)
