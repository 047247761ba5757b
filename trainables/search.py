"""How a sweep chooses and stops trials: Optuna's sampler over the study's define-by-run space (the
paper's defaults first), its settings pinned here rather than left to the installed version's
defaults; Optuna sees every epoch's scheduler metric as an intermediate value (a trial ASHA stops
after epoch 2 carries its two epochs) and the credible objective once, at the trial's end; its
study is kept as a journal in the study folder (``optuna.journal``: optuna-dashboard opens it, and
``--more N`` adds trials with every earlier one in view); a finite space is not sampled twice at
the same point until it is exhausted. ASHA over the per-epoch metric remembers its decisions; and
the smoke test's cut-down study."""

from __future__ import annotations

import functools
import logging
import random
import warnings
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from . import storage as storage_mod
from . import trial_rows as R
from .scheduler import PersistentASHA
from .storage import join
from .study import Study

log = logging.getLogger(__name__)

JOURNAL_NAME = "optuna.journal"  # the Optuna study of a sweep, in its study folder
DUPLICATE_TRIES = 3  # sampler proposals of an already-tried point before an untried one is placed


class FinalObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the objective once, from the trial's final evaluation (the
    credible values, ``objective.<metric>``), and each epoch's ``intermediate`` metric (ASHA's) as an
    intermediate value; in a finite space it never places a trial at a point already tried (same
    values; a sweep's trials share the study's seed) until every point has been."""

    def __init__(self, *args: Any, intermediate: str | None = None, finite: list[dict[str, Any]] | None = None,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._intermediate = intermediate
        self._finite = finite  # every point of a finite space (None: a continuous dimension)
        self._rng = random.Random(seed)
        self._reported: dict[str, set[int]] = {}
        self.exhausted = False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            return  # the final row: on_trial_complete tells Optuna the value
        if (self._intermediate is None or isinstance(self.metric, list) or not R.is_epoch(result)
                or self._intermediate not in result or trial_id in self._completed_trials
                or trial_id not in self._ot_trials):
            return
        step = int(result[R.EPOCH])
        seen = self._reported.setdefault(trial_id, set())
        if step not in seen:  # a restarted trial reports its epochs again
            seen.add(step)
            self._ot_trials[trial_id].report(float(result[self._intermediate]), step)

    def _others(self, number: int) -> list[dict[str, Any]]:
        """The points of every other trial that counts (finished, pruned, running or queued)."""
        from optuna.trial import TrialState

        keep = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        return [dict(t.params) for t in self._ot_study.get_trials(deepcopy=False, states=keep) if t.number != number]

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if self._finite is None or config is None:
            return config
        from optuna.trial import TrialState

        for attempt in range(DUPLICATE_TRIES + 1):
            ot_trial = self._ot_trials[trial_id]
            point = dict(ot_trial.params)
            others = self._others(ot_trial.number)
            if point not in others:
                return config
            untried = [p for p in self._finite if p not in others]
            if not untried:
                if not self.exhausted:
                    log.warning("all %d points of the search space have been tried: further trials repeat points",
                                len(self._finite))
                self.exhausted = True
                return config
            ot_trial.set_user_attr("ancra.duplicate", True)  # never trained: the sampler proposed a tried point
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            del self._ot_trials[trial_id]
            if attempt >= DUPLICATE_TRIES - 1:  # the sampler keeps coming back: place an untried point
                self._ot_study.enqueue_trial(self._rng.choice(untried))
            config = super().suggest(trial_id)
        return config


def optuna_sampler(study: Study, seed: int | None = None, concurrent: int = 1) -> Any:
    """The study's Optuna sampler, every setting pinned (Optuna 4 and 5 differ in their defaults):
    TPE multivariate over the conditional space (``group``), with a constant liar when trials run at
    once, its random start sized to the budget; NSGA-II with a population sized to the budget (its
    default, 50, is more than a shipped sweep's trials: it would never leave its random first
    generation). Seeded with the study's first seed unless ``seed`` is given."""
    import optuna

    seed = study.seeds[0] if seed is None else seed
    if study.search.sampler == "tpe":
        with warnings.catch_warnings():  # multivariate, group and constant_liar are "experimental": chosen here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.search.tpe_startup,
                                              multivariate=True, group=True, constant_liar=concurrent > 1)
    if study.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(study.search.num_samples))
    return optuna.samplers.RandomSampler(seed=seed)


def nsga2_population(num_samples: int) -> int:
    """A quarter of the budget (4 to 50): NSGA-II gets at least four generations."""
    return max(4, min(50, num_samples // 4))


def journal_storage(study_dir: str) -> Any:
    """The sweep's Optuna study as a journal file in its (local) study folder; None for URIs (a journal
    needs a file system that appends atomically)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage_mod.is_uri(study_dir):
        return None
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(Path(study_dir) / JOURNAL_NAME)))


def finite_points(study: Study) -> list[dict[str, Any]] | None:
    """Every point of the study's space when it is finite (categorical and small integer dimensions,
    conditions applied), else None."""
    if not study.search.space:
        return None
    base = study._base_values()
    points: list[dict[str, Any]] = [{}]
    for p in study.search.space:
        if p.choices is not None:
            values: list[Any] = list(p.choices)
        elif p.integer and p.low is not None and p.high is not None and p.high - p.low <= 64:
            values = list(range(int(p.low), int(p.high) + 1))
        else:
            return None
        grown = []
        for point in points:
            active = all(point.get(k, base.get(k)) == v for k, v in p.when.items())
            grown += [{**point, p.name: v} for v in values] if active else [point]
        points = grown
    return points


def build_searcher(study: Study, *, concurrent: int = 1, study_dir: str | None = None, seed: int | None = None) -> Any:
    """The sweep's Tune searcher (seeded with the study's first seed unless ``seed`` is given)."""
    seed = study.seeds[0] if seed is None else seed
    sampler = optuna_sampler(study, seed, concurrent=concurrent)
    keys = [R.objective_key(m) for m in study.objective.metrics]
    metric: Any = keys if study.objective.multi else keys[0]
    mode: Any = list(study.objective.modes) if study.objective.multi else study.objective.mode
    points = [study.default_point()] if study.search.defaults_first and study.search.space else None
    storage = journal_storage(study_dir) if study_dir else None
    if storage is not None and points and any(s.study_name == study.name for s in storage.get_all_studies()):
        points = None  # --more: the defaults were evaluated in an earlier session
    intermediate = study.scheduler.metric if not study.objective.multi else None
    # A partial (not a lambda): Tune pickles the searcher with the study state.
    return FinalObjectiveOptunaSearch(space=functools.partial(_define_by_run, study), metric=metric, mode=mode,
                                      sampler=sampler, points_to_evaluate=points, storage=storage,
                                      study_name=study.name if storage is not None else None,
                                      intermediate=intermediate, finite=finite_points(study), seed=seed)


def _define_by_run(study: Study, trial: Any) -> None:  # noqa: D401
    study.sample(trial)  # suggestions are recorded on the Optuna trial; Tune turns them into config


def build_scheduler(study: Study, *, storage: str | None = None, resume: bool = False) -> Any:
    if study.scheduler.type != "asha":
        return None
    epochs = study.train_config({}, study.seeds[0]).optim.epochs
    sch = study.scheduler
    # stop_last_trials=False: a trial that reaches the last epoch must still run its final evaluation.
    kw = dict(metric=sch.metric, mode=sch.mode, time_attr=R.EPOCH, max_t=epochs, grace_period=sch.grace_period,
              reduction_factor=sch.reduction_factor, stop_last_trials=False)
    if storage is None:
        from .scheduler import LastEpochASHA

        return LastEpochASHA(**kw)
    # Its rung records and stopped trials are saved beside the study: --resume stops what an
    # uninterrupted study would.
    return PersistentASHA(study_dir=join(storage, study.name), resume=resume, **kw)


def smoke_study(study: Study) -> Study:
    """One epoch on a few batches, two trials: checks a study file end to end in a minute."""
    from dataclasses import replace

    train = study.train.replace(**{"optim.epochs": 1, "data.train_limit": 4 * study.train.data.batch_size,
                                   "eval.max_examples": 64})
    suite = replace(study.suite, n_examples=64, autoattack=None, square_queries=20, apgd_iters=5, apgd_targets=2)
    scheduler = replace(study.scheduler, grace_period=1)  # the one epoch: ASHA decides after it
    search = replace(study.search, num_samples=min(2, study.search.num_samples))
    return replace(study, train=train, search=search, suite=suite, seeds=study.seeds[:1],
                   scheduler=scheduler)


def decided_by_scheduler(study: Study) -> bool:
    """Whether the study's trials are Ray Train runs that a scheduler may stop between epochs: their
    workers learn its decisions from the study's board (:mod:`trainables.stop_relay`)."""
    return study.kind != "ablation" and study.scheduler.type == "asha" and not study.resources.train_in_trial
