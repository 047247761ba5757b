"""How a sweep chooses and stops trials: Optuna's sampler over the study's define-by-run space (the
paper's defaults first), told the credible objective once per trial; ASHA over the per-epoch metric
that remembers its decisions; and the smoke test's cut-down study."""

from __future__ import annotations

import functools
import logging
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from . import trial_rows as R
from .scheduler import PersistentASHA
from .storage import join
from .study import Study

log = logging.getLogger(__name__)


class FinalObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the objective once, from the trial's final evaluation (the
    credible values, ``objective.<metric>``); per-epoch results (without it) are for the scheduler."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


def optuna_sampler(study: Study, seed: int | None = None) -> Any:
    """The study's Optuna sampler (seeded with its first seed unless ``seed`` is given)."""
    import optuna

    seed = study.seeds[0] if seed is None else seed
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.search.tpe_startup),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[study.search.sampler]()


def build_searcher(study: Study) -> Any:
    sampler = optuna_sampler(study)
    keys = [R.objective_key(m) for m in study.objective.metrics]
    metric: Any = keys if study.objective.multi else keys[0]
    mode: Any = list(study.objective.modes) if study.objective.multi else study.objective.mode
    points = [study.default_point()] if study.search.defaults_first and study.search.space else None
    # A partial (not a lambda): Tune pickles the searcher with the study state.
    return FinalObjectiveOptunaSearch(space=functools.partial(_define_by_run, study), metric=metric, mode=mode,
                        sampler=sampler, points_to_evaluate=points)


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
