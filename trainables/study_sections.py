"""The sections of a study file as typed objects, each validated when built: what a trial occupies
(:class:`Resources`), the scheduler (:class:`SchedulerConfig`), what a trial is scored on
(:class:`Objective`), the search (:class:`Search`, of :class:`Param` dimensions), the ablation's
grid (:class:`Ablation`), and the names a study file may use."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ancra_tune.config import (
    ConfigError,
    check_choice,
    check_field,
)
from ancra_tune.metric_names import SCHEDULER_METRICS

KINDS = ("sweep", "ablation")


SAMPLERS = ("tpe", "nsga2", "random")


SCHEDULERS = ("asha", "none")


MODES = ("max", "min")


#: end-of-trial metrics every evaluation reports (besides acc_<attack> of its plan)
REPORT_METRICS = ("clean_acc", "robust_acc_worst", "autoattack_acc", "checks_passed", "eval_flagged",
                  "eval_n_examples", "eval_check_examples", "epoch_time_s_mean", "train_time_s")


TOP_KEYS = ("name", "kind", "base", "train", "resources", "objective", "evaluation", "eval", "search", "scheduler",
            "seeds", "ablation", "max_failures", "description")


class StudyError(ConfigError):
    """A study file is invalid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Resources:
    """What one trial occupies: the Tune trial itself (the Train driver) and its workers.

    A one-worker trial trains inside the Tune trial (``in_process``, the default): it occupies the
    same resources in one process, and skips the Train worker group's start-up (seconds per
    trial, see benchmarks/trial_overhead.py). ``in_process: false`` starts one anyway.
    """

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions share a GPU between small trials
    trial_cpus: float = 0.5  # the function trainable that drives the Train run (must be > 0)
    sync_batchnorm: bool = True  # global BatchNorm statistics across workers (see ancra_tune.distributed)
    in_process: bool = True  # one worker: train in the Tune trial, no Ray Train worker group

    @property
    def train_in_trial(self) -> bool:
        return self.in_process and self.workers == 1

    def __post_init__(self) -> None:
        s = "resources"
        check_field(self.workers >= 1, s, "workers", self.workers, ">= 1")
        check_field(self.trial_cpus > 0, s, "trial_cpus", self.trial_cpus, "> 0 (Ray refuses a trial of 0 CPUs)")
        check_field(self.cpus_per_worker >= 0, s, "cpus_per_worker", self.cpus_per_worker, ">= 0")
        check_field(self.gpus_per_worker >= 0, s, "gpus_per_worker", self.gpus_per_worker, ">= 0")

    @property
    def trial_total(self) -> dict[str, float]:
        return {"CPU": self.trial_cpus + self.workers * self.cpus_per_worker,
                "GPU": self.workers * self.gpus_per_worker}


@dataclass(frozen=True)
class SchedulerConfig:
    """ASHA over the per-epoch validation metric (``time_attr`` = epoch), or none."""

    type: str = "asha"
    metric: str = "val_robust_acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        s = "scheduler"
        check_choice(s, "type", self.type, SCHEDULERS)
        check_choice(s, "mode", self.mode, MODES)
        check_field(self.metric in SCHEDULER_METRICS, s, "metric", self.metric,
                    f"a per-epoch validation metric: one of {', '.join(SCHEDULER_METRICS)}")
        check_field(self.grace_period >= 1, s, "grace_period", self.grace_period, ">= 1")
        check_field(self.reduction_factor >= 2, s, "reduction_factor", self.reduction_factor, ">= 2")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    name: str  # dotted TrainConfig key
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: dict[str, Any] = field(default_factory=dict)  # active only when these keys have these values


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Objective:
    """What a trial is scored on: one metric (a single-objective study) or several (a Pareto front),
    each with its direction."""

    metrics: tuple[str, ...] = ("robust_acc_worst",)
    modes: tuple[str, ...] = ("max",)

    def __post_init__(self) -> None:
        check_field(bool(self.metrics) and len(self.metrics) == len(self.modes), "objective", "metrics/modes",
                    f"{list(self.metrics)}/{list(self.modes)}", "the same, non-zero length")
        for m in self.modes:
            check_choice("objective", "mode", m, MODES)

    @property
    def metric(self) -> str:
        """The first (ranking) metric."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @classmethod
    def from_section(cls, o: dict[str, Any]) -> Objective:
        if "metrics" in o:
            metrics = tuple(o["metrics"])
            return cls(metrics, tuple(o.get("modes", ["max"] * len(metrics))))
        return cls((o.get("metric", "robust_acc_worst"),), (o.get("mode", "max"),))


@dataclass(frozen=True)
class Search:
    """How a sweep places its trials: the sampler, the budget and the (conditional) space."""

    sampler: str = "tpe"
    num_samples: int = 8
    max_concurrent: int | None = None  # None: as many as the cluster fits ("auto")
    defaults_first: bool = True  # the paper's defaults as the first trial
    startup_trials: int | None = None  # TPE's random trials before it models; None: see `tpe_startup`
    space: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        s = "search"
        check_choice(s, "sampler", self.sampler, SAMPLERS)
        check_field(_count(self.num_samples) and self.num_samples >= 1, s, "num_samples", self.num_samples,
                    "an integer >= 1")
        check_field(self.max_concurrent is None or (_count(self.max_concurrent) and self.max_concurrent >= 1), s,
                    "max_concurrent", self.max_concurrent, "'auto' or an integer >= 1")
        check_field(self.startup_trials is None or (_count(self.startup_trials) and self.startup_trials >= 1), s,
                    "startup_trials", self.startup_trials,
                    "an integer >= 1, or null (a quarter of the trials, 2 to 10)")

    @property
    def tpe_startup(self) -> int:
        """Trials TPE samples at random before it models the results: ``search.startup_trials``, else
        a quarter of the trials (2 to 10). Optuna's own default, 10, makes a sweep of 10 trials or
        fewer a random search (benchmarks/search_efficiency.py)."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(2, min(10, self.num_samples // 4))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.space)


@dataclass(frozen=True)
class Ablation:
    """An ablation's grid of components (the seeds are a separate axis)."""

    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None  # the row every other row is compared with (None: the first point)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid, in the file's order (the first is the baseline row)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]
