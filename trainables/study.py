"""Study files (``search_spaces/*.yaml``): what a sweep or an ablation runs.

A study states only what differs from the paper defaults. Every section is validated when
the file is read; a mistake names the file, the key and what is allowed::

    name: quickstart
    kind: sweep                 # sweep (Optuna + ASHA) or ablation (a full grid x seeds)
    base: quickstart            # optional: a train preset or YAML file to start from
    train: {model.name: small_cnn, optim.epochs: 4}    # overrides of that config
    resources: {workers: 2, cpus_per_worker: 0.5, gpus_per_worker: 0, trial_cpus: 0.5}
    objective: {metric: robust_acc_worst, mode: max}   # or metrics: [...], modes: [...]
    evaluation: {preset: quick, n_examples: 200, autoattack: null}   # end-of-trial suite (train.eval: per epoch)
    search:
      sampler: tpe              # tpe, nsga2 (multi-objective), random
      num_samples: 8
      max_concurrent: auto
      defaults_first: true      # evaluate the paper's defaults as the first trial
      startup_trials: null      # TPE's random trials first (default: a quarter of num_samples, 2 to 10)
      space:
        method.anc: [true, false]                              # categorical
        method.alpha: {low: 0.0, high: 1.0, when: method.anc}  # only when ANC is on
        method.zeta: {low: 0.5, high: 6.0, log: true, when: method.anc}
    scheduler: {type: asha, metric: val_robust_acc, grace_period: 1, reduction_factor: 2}
    seeds: [0]
    ablation: {grid: {method.anc: [false, true], model.ra: [false, true]}}  # baseline: the first point
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ancra_tune.config import (
    ConfigError,
    TrainConfig,
    build_dataclass,
    check_choice,
    check_field,
    flatten,
    load_yaml_with_overrides,
    merge_config,
    read_yaml_mapping,
    resolve_config_path,
)
from ancra_tune.robustness.suite import SuiteConfig, plan_attacks

from .study_sections import (
    KINDS,
    REPORT_METRICS,
    SAMPLERS,
    TOP_KEYS,
    Ablation,
    Objective,
    Param,
    Resources,
    SchedulerConfig,
    Search,
    StudyError,
)


@dataclass(frozen=True)
class Study:
    """A validated study file: its base training config, the end-of-trial evaluation suite and the
    scheduler are typed objects, checked when the file loads."""

    name: str
    kind: str
    path: Path
    train: TrainConfig  # the base training config (preset/file + the study's `train` overrides)
    resources: Resources
    objective: Objective
    suite: SuiteConfig  # the end-of-trial evaluation on the validation split (the file's top-level `eval`)
    search: Search
    scheduler: SchedulerConfig
    seeds: tuple[int, ...]
    ablation: Ablation
    max_failures: int

    def train_config(self, params: Mapping[str, Any], seed: int) -> TrainConfig:
        """The trial's TrainConfig: the study's base with the sampled ``params`` and ``seed``."""
        return TrainConfig.from_dict({**flatten(self.train), **params, "seed": seed})

    def _base_values(self) -> dict[str, Any]:
        """The base config's values as trained (beta resolved for its base loss)."""
        return flatten(self.train, resolved=True)

    def default_point(self) -> dict[str, Any]:
        """The paper's defaults (the base config's values) for every active parameter."""
        base = self._base_values()
        point: dict[str, Any] = {}
        for p in self.search.space:
            if _active(p, point, base):
                point[p.name] = base[p.name]
        return point

    def sample(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest each parameter whose condition holds (conditional space)."""
        base = self._base_values()
        point: dict[str, Any] = {}
        for p in self.search.space:
            if not _active(p, point, base):
                continue
            if p.choices is not None:
                point[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.integer:
                point[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
            else:
                point[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)  # type: ignore[arg-type]
        return point

    def is_valid_point(self, point: Mapping[str, Any]) -> bool:
        """True if ``point`` holds exactly the active parameters, each within its range."""
        base = self._base_values()
        seen: dict[str, Any] = {}
        for p in self.search.space:
            active = _active(p, seen, base)
            if active != (p.name in point):
                return False
            if not active:
                continue
            v = point[p.name]
            if p.choices is not None and v not in p.choices:
                return False
            if p.choices is None and not (p.low <= v <= p.high):  # type: ignore[operator]
                return False
            seen[p.name] = v
        return set(point) <= set(self.search.names)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the ablation grid (the seeds are a separate axis)."""
        return self.ablation.points()

    def objective_metrics(self) -> tuple[str, ...]:
        """Every metric a finished trial reports: what an objective may name."""
        names = set(REPORT_METRICS)
        for ra in (False, True):
            names |= {f"acc_{s.name}" for s in plan_attacks(self.suite, ra=ra, has_source=False)}
        return tuple(sorted(names))


def _active(p: Param, point: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    return all(point.get(k, base.get(k)) == v for k, v in p.when.items())


# --------------------------------------------------------------------------- loading


def _err(path: Path, key: str, msg: str) -> StudyError:
    return StudyError(f"{path}: {key}: {msg}")


def _section(path: Path, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise _err(path, key, f"must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _err(path, key, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return dict(value)


def _param(path: Path, name: str, spec: Any, flat_base: Mapping[str, Any]) -> Param:
    where = f"search.space.{name}"
    if name not in flat_base:
        raise _err(path, where, f"not a training config key; known: {', '.join(sorted(flat_base))}")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        raise _err(path, where, "must be a list of choices or a mapping with choices or low/high")
    allowed = ("choices", "low", "high", "log", "int", "when")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise _err(path, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    when = spec.get("when") or {}
    if isinstance(when, str):
        when = {when: True}
    if not isinstance(when, Mapping) or any(k not in flat_base for k in when):
        raise _err(path, f"{where}.when", f"must name training config keys (e.g. method.anc), got {when!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise _err(path, f"{where}.choices", "must be a non-empty list")
        return Param(name=name, choices=tuple(choices), when=dict(when))
    if "low" not in spec or "high" not in spec:
        raise _err(path, where, "needs choices, or low and high")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise _err(path, where, f"low and high must be numbers with low < high, got {low!r}, {high!r}")
    if spec.get("log") and low <= 0:
        raise _err(path, where, "log scale needs low > 0")
    return Param(name=name, low=float(low), high=float(high), log=bool(spec.get("log", False)),
                 integer=bool(spec.get("int", False)), when=dict(when))


def _absolute_data_files(train: TrainConfig) -> TrainConfig:
    """Relative ``data.train_file``/``test_file`` are read from the folder the command runs in:
    made absolute here, because Ray's workers run elsewhere."""
    files = {k: str(Path(v).expanduser().resolve()) for k in ("train_file", "test_file")
             if (v := getattr(train.data, k)) and "://" not in v and not Path(v).expanduser().is_absolute()}
    return dataclasses.replace(train, data=dataclasses.replace(train.data, **files)) if files else train


def shipped_studies() -> dict[str, Path]:
    """The study files installed with the package (``search_spaces/*.yaml``), by name."""
    from importlib import resources

    try:
        root = resources.files("search_spaces")
    except ModuleNotFoundError:
        return {}
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".yaml")}


def resolve_study_path(name: str | Path) -> Path:
    """A study file's path, or the name of one shipped with the package (``ancra-tune sweep quickstart``),
    as presets resolve."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_studies()
    if str(name) in shipped:
        return shipped[str(name)]
    raise StudyError(f"study {str(name)!r} is neither a file nor a shipped study; shipped: "
                     f"{', '.join(sorted(shipped)) or 'none found'}")


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (a path, or a shipped study's name): every mistake fails here,
    naming the file and the key."""
    p = resolve_study_path(path)
    try:
        return _load(p)
    except StudyError:
        raise
    except ConfigError as e:
        raise StudyError(f"{p}: {e}") from None


def _load(p: Path) -> Study:
    try:
        raw = read_yaml_mapping(p, "study file")
    except ConfigError as e:
        raise StudyError(str(e)) from None
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _err(p, "top level", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")
    kind = raw.get("kind", "sweep")
    check_choice("", "kind", kind, KINDS)

    # The training config: a preset/file, then the study's overrides, validated now.
    train_over = raw.get("train") or {}
    if not isinstance(train_over, Mapping):
        raise _err(p, "train", "must be a mapping of training config keys")
    try:
        base_path = resolve_config_path(raw["base"]) if raw.get("base") else None
        base_dict = load_yaml_with_overrides(base_path)
        # Keys given in `train` (nested or dotted) win over the base's.
        train = TrainConfig.from_dict(merge_config(base_dict, train_over))
    except ConfigError as e:
        raise StudyError(f"{p}: train: {e}") from None
    train = _absolute_data_files(train)
    # Trials are compared on metrics of a split held out from training, never on the test set.
    if train.data.val_size <= 0:
        raise _err(p, "train.data.val_size", f"= {train.data.val_size} is invalid: a study scores its trials on "
                   "a validation split held out from the training set; set it > 0 (e.g. 0.1)")
    if train.eval.split != "val":
        raise _err(p, "train.eval.split", f"= {train.eval.split!r} is invalid: trials are compared on the "
                   "validation split, never on test; set eval.split: val")
    flat_base = flatten(train)

    resources = build_dataclass(Resources, _section(p, raw, "resources", _fields(Resources)), "resources")
    if train.data.batch_size % resources.workers:
        raise _err(p, "resources.workers", f"data.batch_size {train.data.batch_size} must be divisible by "
                   f"{resources.workers} workers")

    objective = Objective.from_section(_section(p, raw, "objective", ("metric", "mode", "metrics", "modes")))

    # `evaluation` (the end-of-trial suite), distinct from `train.eval` (per-epoch validation); `eval`
    # is its older name, still read.
    if "evaluation" in raw and "eval" in raw:
        raise _err(p, "evaluation", "given twice (as `evaluation` and as its older name `eval`): keep `evaluation`")
    ev = raw.get("evaluation", raw.get("eval")) or {}
    if not isinstance(ev, Mapping):
        raise _err(p, "evaluation", f"must be a mapping of evaluation settings, got {ev!r}")
    # The trials' training budget is the evaluation's default: `eps: 8/255` may still override it.
    suite = SuiteConfig.from_mapping(ev, defaults={"eps": train.attack.eps})

    s = _section(p, raw, "search", ("sampler", "num_samples", "max_concurrent", "defaults_first", "startup_trials",
                                    "space"))
    sampler = s.get("sampler", "nsga2" if objective.multi else "tpe")
    check_choice("search", "sampler", sampler, SAMPLERS)
    if objective.multi and sampler == "tpe":
        sampler = "nsga2"
    space_raw = s.get("space") or {}
    if not isinstance(space_raw, Mapping):
        raise _err(p, "search.space", "must be a mapping of training config keys")
    space = tuple(_param(p, k, v, flat_base) for k, v in space_raw.items())
    for prm in space:
        for k in prm.when:
            if k not in {q.name for q in space} and k not in flat_base:
                raise _err(p, f"search.space.{prm.name}.when", f"unknown key {k}")
    mc = s.get("max_concurrent", "auto")
    search = Search(sampler=sampler, num_samples=s.get("num_samples", 8), max_concurrent=None if mc == "auto" else mc,
                    defaults_first=bool(s.get("defaults_first", True)), startup_trials=s.get("startup_trials"),
                    space=space)

    sch = _section(p, raw, "scheduler", _fields(SchedulerConfig))
    sch.setdefault("type", "asha" if not objective.multi and kind == "sweep" else "none")
    scheduler = build_dataclass(SchedulerConfig, sch, "scheduler")
    if scheduler.type == "asha" and objective.multi:
        raise _err(p, "scheduler.type", "ASHA needs a single objective; use type: none for multi-objective")
    if scheduler.type == "asha" and scheduler.grace_period > train.optim.epochs:
        raise _err(p, "scheduler.grace_period", f"= {scheduler.grace_period} is more than the trials' "
                   f"{train.optim.epochs} epoch(s) (train.optim.epochs): ASHA's first decision would come after "
                   "the last epoch; lower it or train longer")

    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    check_field(isinstance(seeds, list) and bool(seeds) and all(isinstance(x, int) for x in seeds), "", "seeds",
                seeds, "a list of integers or a count")

    a = _section(p, raw, "ablation", ("grid", "baseline"))
    grid_raw = a.get("grid") or {}
    grid: dict[str, tuple[Any, ...]] = {}
    for k, v in grid_raw.items():
        if k not in flat_base:
            raise _err(p, f"ablation.grid.{k}", f"not a training config key; known: {', '.join(sorted(flat_base))}")
        if not isinstance(v, list) or not v:
            raise _err(p, f"ablation.grid.{k}", "must be a non-empty list of values")
        grid[k] = tuple(v)
    if kind == "ablation" and not grid:
        raise _err(p, "ablation.grid", "an ablation needs a grid of components")
    baseline = a.get("baseline")
    if baseline is not None:
        if not isinstance(baseline, Mapping) or set(baseline) != set(grid) or \
                any(baseline[k] not in grid[k] for k in grid):
            raise _err(p, "ablation.baseline", f"= {baseline!r} must name one value of each grid key "
                       f"({', '.join(grid)}) from the grid: the row every other row is compared with")
        baseline = {k: baseline[k] for k in grid}
    max_failures = raw.get("max_failures", 2)
    check_field(isinstance(max_failures, int) and max_failures >= 0, "", "max_failures", max_failures,
                "an integer >= 0")

    study = Study(name=str(raw.get("name", p.stem)), kind=kind, path=p, train=train, resources=resources,
                  objective=objective, suite=suite, search=search, scheduler=scheduler, seeds=tuple(seeds),
                  ablation=Ablation(grid, baseline), max_failures=max_failures)
    known = study.objective_metrics()
    for m in objective.metrics:
        if m not in known:
            raise _err(p, "objective.metric", f"{m!r} is not a metric a trial reports; known: {', '.join(known)}")
    # Every grid point and the default point must make a valid training config.
    for point in ([study.default_point()] + study.grid_points()):
        try:
            study.train_config(point, seed=study.seeds[0])
        except ConfigError as e:
            raise StudyError(f"{p}: {point}: {e}") from None
    return study


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))
