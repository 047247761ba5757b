"""Where a study stands, from its folder alone: ``ancra-tune status STUDY_FILE``.

A study too long for one session runs over many (``--resume``). Between them, and while one runs
(from another shell or machine that sees the storage), this says what is done and what is left
without a Ray instance, MLflow or the lock: whether a driver runs it now, its wall time over its sessions, and
each trial (started ones from their folders; an ablation's others from its grid): its epochs, and
where it is between results (its epoch's step at the last mid-epoch checkpoint, its evaluation's
finished batches: :mod:`trainables.progress`), or that it is evaluated, diverged, stopped by the
scheduler, failed or waiting; for an ablation, the time left at the rates its own trials measured
(:func:`time_left`). It shows no trial's evaluation: that is the study's answer (``ancra-tune
report``, once it has finished).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ancra_tune.config import params_text
from ancra_tune.trainer import PARTIAL_NAME

from . import sessions, storage
from . import trial_rows as R
from .progress import EVALUATING, TRAINING, ProgressFile, describe
from .scheduler import read_state
from .study import Study
from .study_carry import carried, read_mark
from .study_export import imported_rows, point_key, trial_points
from .study_lock import HOLDER_NAME
from .trial import SEED_KEY

# Tune's trial folders: run_trial_<trial id>_<counter>_<params>_<date>; an ablation's trial ids end in
# its grid variant (9f600_00000), a sweep's do not (652a40ad).
TRIAL_FOLDER = re.compile(r"^run_trial_([0-9a-f]+(?:_\d{5})?)_(\d+)_")
EVALUATED, DIVERGED, STOPPED, FAILED, RUNNING, WAITING = (
    "evaluated", "diverged", "stopped", "failed", "unfinished", "waiting")


@dataclass
class TrialStatus:
    trial_id: str | None  # None: not started yet
    params: dict[str, Any]
    state: str  # EVALUATED, DIVERGED, STOPPED, FAILED, RUNNING, WAITING
    epochs: int = 0  # finished epochs
    train_time_s: float = 0.0
    now: str = ""  # where it is, for people
    progress: dict[str, Any] | None = None  # its progress file, when current
    eval_s: float = 0.0  # its evaluation's seconds so far (0: not measured)
    eval_examples: int = 0  # the examples its evaluation has done
    eval_timed: int = 0  # ... of which the seconds above timed (batches kept by d923040 have no time)


@dataclass
class StudyStatus:
    study: str
    kind: str
    study_dir: str
    epochs: int
    driver: dict[str, Any] | None  # who runs it now (the lock's holder), None: nobody
    sessions: int
    wall_time_s: float
    planned: int  # trials the study file asks for (a sweep: its samples and extensions)
    trials: list[TrialStatus] = field(default_factory=list)
    slots: int = 1  # trials at once (the last session's)
    left_s: float | None = None  # an ablation's trial-seconds left at the rates measured so far
    not_counted: list[str] = field(default_factory=list)  # what that leaves out (nothing measured yet)
    resume_command: str | None = None  # the command its last stopped session said goes on with it
    rates: dict[str, RowRates] = field(default_factory=dict)  # an ablation's rates by row, measured so far

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (EVALUATED, RUNNING, WAITING, STOPPED, DIVERGED, FAILED)}
        for t in self.trials:
            out[t.state] += 1
        out[WAITING] += max(0, self.planned - len(self.trials))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts()}


def _trial_folders(fs: Any, study_dir: str) -> list[str]:
    """The study's trial folders, its extensions' (``more-<k>/``) included, in creation order."""
    import pyarrow.fs

    def folders(root: str, prefix: str) -> list[Any]:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        return [i for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)]

    out: list[str] = []
    for root in [study_dir] + sorted(i.path for i in folders(study_dir, "more-")):
        out += [i.path for i in sorted(folders(root, "run_trial_"), key=lambda i: _counter(i.base_name))]
    return out


def _counter(name: str) -> int:
    try:  # run_trial_<id>_<counter>_...
        return int(name.split("_")[3])
    except (IndexError, ValueError):
        return 0


def _json_lines(fs: Any, path: str) -> list[dict[str, Any]]:
    raw = storage.fs_read(fs, path)
    rows = []
    for line in (raw or b"").decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _driver(fs: Any, study_dir: str) -> dict[str, Any] | None:
    """The process that holds the study's lock (``study_lock``), if it is alive; a killed driver's
    note is left behind, and one on another host is taken at its word."""
    raw = storage.fs_read(fs, f"{study_dir}/{HOLDER_NAME}")
    try:
        holder = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(holder, dict):
        return None
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return None
        except PermissionError:  # alive, another user's
            pass
    return holder


def trial_status(fs: Any, folder: str, epochs: int, stopped: set[str], rows: list[dict[str, Any]],
                 batch_size: int | None = None) -> TrialStatus:
    """One started trial, from its folder and its results (``rows``, its ``result.json``);
    ``batch_size``: its evaluation's batches (the study's suite)."""
    # Going on from state carried off a lost machine: the epochs it trained there count too.
    try:
        mark, unread = read_mark(fs, folder) or {}, None
    except ValueError as e:  # status still answers; the trial says what it could not read
        mark, unread = {}, e
    t = _trial_status(fs, folder, epochs, stopped, rows, batch_size, mark)
    if unread is not None:
        t.now += f"; its epochs before a carry are not counted: {unread}"
    return t


def _trial_status(fs: Any, folder: str, epochs: int, stopped: set[str], rows: list[dict[str, Any]],
                  batch_size: int | None, mark: dict[str, Any]) -> TrialStatus:
    raw = storage.fs_read(fs, f"{folder}/params.json")
    params = json.loads(raw) if raw else {}
    named = TRIAL_FOLDER.match(folder.rstrip("/").rsplit("/", 1)[-1])
    trial_id = next((str(r["trial_id"]) for r in rows if r.get("trial_id")), named.group(1) if named else folder)
    done = [r for r in rows if R.is_epoch(r)]
    t = TrialStatus(trial_id=trial_id, params=params, state=RUNNING,
                    epochs=max([int(mark.get("epochs_run") or 0) + len(done)]
                               + [int(r[R.EPOCH]) for r in done if isinstance(r.get(R.EPOCH), (int, float))]),
                    train_time_s=float(mark.get("train_time_s") or 0.0) + float(sum(r["epoch_time_s"] for r in done)))
    final = next((r for r in rows if R.is_final(r)), None)
    if final is not None:
        t.state, t.now = EVALUATED, "evaluated"
        t.eval_s = float(final.get(R.TIMING_PREFIX + "eval_s") or 0.0)
        t.eval_examples = int(final.get("eval_n_examples") or 0)
        # batches taken from an earlier start count their own time, unless d923040 kept them: those
        # have none. They were the first ones (an evaluation keeps its batches in order).
        untimed = int(final.get(R.TIMING_PREFIX + "eval_untimed_batches") or 0)
        if untimed:
            t.eval_timed = max(0, t.eval_examples - untimed * batch_size) if batch_size else 0
        else:
            t.eval_timed = t.eval_examples
        return t
    diverged = next((r for r in rows if R.is_diverged(r)), None)
    if diverged is not None:
        t.state, t.now = DIVERGED, f"diverged at epoch {diverged.get(R.DIVERGED_EPOCH)}"
        return t
    if trial_id in stopped:
        t.state, t.now = STOPPED, f"stopped by the scheduler after epoch {t.epochs}"
        return t
    p = ProgressFile(fs, folder).read()
    if p is not None and (p["phase"] == EVALUATING or (p["phase"] == TRAINING and int(p["epoch"]) > t.epochs)):
        t.progress, t.now = p, describe(p)
        if p["phase"] == EVALUATING:
            # Its training has ended, though Tune may not have written the last epoch's row yet.
            t.epochs = max(t.epochs, epochs)
            t.eval_s, t.eval_examples = float(p["seconds"]), int(p["examples"])
            t.eval_timed = int(p.get("timed", t.eval_examples))
    elif t.epochs >= epochs:
        text, t.eval_examples = _kept_batches(fs, folder)
        t.now = f"trained; {text}"
    else:
        t.now = f"{t.epochs} of {epochs} epochs done"
        partial = fs.get_file_info(f"{folder}/{PARTIAL_NAME}")
        if partial.mtime_ns:  # a version without progress files left only this
            t.now += (f"; epoch {t.epochs + 1} has a mid-epoch checkpoint of "
                      f"{time.strftime('%H:%M', time.localtime(partial.mtime_ns / 1e9))}")
    if storage.fs_exists(fs, f"{folder}/error.txt"):
        t.state = FAILED  # unless a driver runs it again (study_status)
        t.now += "; it failed (error.txt in its folder)"
    return t


def _waiting(params: dict[str, Any], carried_point: dict[str, Any] | None) -> TrialStatus:
    """A pair no trial has started yet; ``carried_point``: the state carried for it, if any."""
    if carried_point is None:
        return TrialStatus(trial_id=None, params=params, state=WAITING, now="waiting")
    n = int(carried_point.get("epochs_run") or 0)
    where = f"{n} epoch(s) done" + (" + part of the next" if carried_point.get("mid_epoch") else "")
    if carried_point.get("eval_batches"):
        where += f", {carried_point['eval_batches']} evaluation batch(es) kept"
    return TrialStatus(trial_id=None, params=params, state=WAITING, epochs=n,
                       train_time_s=float(carried_point.get("train_time_s") or 0.0),
                       now=f"waiting; goes on from the state carried from trial {carried_point.get('trial_id')} "
                           f"({where})")


def imported_status(row: dict[str, Any]) -> TrialStatus:
    """A trial its record brought into the study (``--from-record``): evaluated or diverged before the
    folder was lost, with the time its training and evaluation took."""
    evaluated = row.get("status") == "finished"
    n = int(row.get("eval_n_examples") or 0)
    return TrialStatus(trial_id=str(row["trial_id"]), params=dict(row.get("params", {})),
                       state=EVALUATED if evaluated else DIVERGED, epochs=int(row.get("epochs_run") or 0),
                       train_time_s=float(row.get("train_time_s") or 0.0),
                       now=("evaluated" if evaluated else f"diverged at epoch {row.get('diverged_epoch')}")
                       + " (from the study's record)",
                       eval_s=float(row.get("eval_time_s") or 0.0) if evaluated else 0.0,
                       eval_examples=n if evaluated else 0, eval_timed=n if evaluated else 0)


def _kept_batches(fs: Any, folder: str) -> tuple[str, int]:
    """What a trained trial's evaluation has kept (``eval_batches/``; what a version without
    progress files leaves too), and how many examples that is."""
    import pyarrow.fs

    from .trial_eval import EVAL_BATCHES

    raw = storage.fs_read(fs, f"{folder}/{EVAL_BATCHES}/meta.json")
    try:
        meta = json.loads(raw) if raw else None
        n, size = len(meta["examples"]), int(meta["suite"]["batch_size"])
    except (ValueError, KeyError, TypeError):
        return "its evaluation has not kept a batch yet", 0
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{folder}/{EVAL_BATCHES}", allow_not_found=True))
    kept = sorted(int(i.base_name[6:11]) for i in infos if i.base_name.startswith("batch_")
                  and i.base_name.endswith(".pt"))
    examples = sum(min(n, (b + 1) * size) - b * size for b in kept)
    return (f"evaluation: {len(kept)} of {-(-n // size)} batches kept ({examples:,} of {n:,} examples; "
            f"the last at {time.strftime('%H:%M', time.localtime(max(i.mtime_ns for i in infos) / 1e9))})",
            examples)


def last_activity(study_dir: str, since: float) -> float | None:
    """The last time after ``since`` that a trial of the study left a trace: a result, its progress
    file, its mid-epoch checkpoint or an evaluation batch it kept. A killed driver's session lasted
    until then (its trials' results alone say less: an epoch or an evaluation can take hours)."""
    import pyarrow.fs

    from .trial_eval import EVAL_BATCHES

    fs, path = storage.filesystem(study_dir)
    seen: list[float] = []
    for folder in _trial_folders(fs, path):
        seen += [float(r[R.REPORTED_AT]) for r in _json_lines(fs, f"{folder}/result.json")
                 if isinstance(r.get(R.REPORTED_AT), (int, float))]
        p = ProgressFile(fs, folder).read()
        if p is not None:
            seen.append(float(p["at"]))
        infos = [fs.get_file_info(f"{folder}/{PARTIAL_NAME}")]
        infos += fs.get_file_info(pyarrow.fs.FileSelector(f"{folder}/{EVAL_BATCHES}", allow_not_found=True))
        seen += [i.mtime_ns / 1e9 for i in infos if i.mtime_ns]
    seen = [t for t in seen if t >= since]
    return max(seen) if seen else None


def study_status(study: Study, storage_root: str) -> StudyStatus:
    """Where ``study`` (in ``storage_root``) stands now, from its folder."""
    study_dir = storage.join(storage_root, study.name)
    fs, path = storage.filesystem(study_dir)
    history = sessions.load(study_dir)
    state = read_state(study_dir) or {}
    stopped = set(state.get("stopped", ()))
    epochs = study.train.optim.epochs
    results = {f: _json_lines(fs, f"{f}/result.json") for f in _trial_folders(fs, path)}
    batch_size = study.suite.batch_size if study.suite is not None else None
    trials = [trial_status(fs, f, epochs, stopped, rows, batch_size) for f, rows in results.items()]
    driver = _driver(fs, path)
    for t in trials:
        if t.state == FAILED and driver:  # Tune retries a failed trial while it has failures left
            t.state = RUNNING
    reported = [float(r[R.REPORTED_AT]) for rows in results.values() for r in rows
                if isinstance(r.get(R.REPORTED_AT), (int, float))]
    # The session running now lasts until now; one whose driver was killed, until its last result.
    last_start = history[-1].started if history else 0.0
    now = time.time() if driver else max([last_start] + [t for t in reported if t >= last_start])
    wall = sessions.wall_time_s(history, reported, now=now)
    if driver:  # an evaluation's progress file is written when a batch is kept: count the one running
        for t in trials:
            if t.state == RUNNING and t.progress and t.progress["phase"] == EVALUATING:
                t.now = describe(t.progress, running_since=max(float(t.progress.get("at", 0)), last_start), now=now)
    if study.kind == "ablation":
        planned = len(study.grid_points()) * len(study.seeds)
        brought = [imported_status(r) for r in imported_rows(study_dir)]  # --from-record: before this folder
        trials = brought + trials
        started = {point_key(t.params) for t in trials}
        half_done = carried(study_dir)  # --carry: these start first, from where they were
        trials += sorted((_waiting(q, half_done.get(point_key(q))) for q in trial_points(study)
                          if point_key(q) not in started),  # in the order Tune starts them
                         key=lambda t: point_key(t.params) not in half_done)
    else:
        planned = study.search.num_samples + sum(sessions.extensions(history).values())
    st = StudyStatus(study=study.name, kind=study.kind, study_dir=study_dir, epochs=epochs, driver=driver,
                     sessions=len(history), wall_time_s=wall, planned=planned, trials=trials,
                     slots=history[-1].slots if history else 1, resume_command=_resume_command(storage_root, study))
    if study.kind == "ablation" and study.suite is not None:
        st.rates = measured_rates(trials)
        st.left_s, st.not_counted = time_left(trials, st.rates, epochs, study.suite.n_examples)
    return st


def _resume_command(storage_root: str, study: Study) -> str | None:
    """The command the study's last stopped session printed to go on (its ``summary.json``): the one it
    was run with, its flags (``--tracking-uri``, ``--storage``) included."""
    from .study_history import summary_dir

    summary = storage.read_json(storage.join(summary_dir(storage_root, study.name), "summary.json"))
    command = summary.get("resume_command") if isinstance(summary, dict) else None
    return command if isinstance(command, str) and command else None


@dataclass
class RowRates:
    """What one configuration's trials have measured so far: seconds per epoch over the epochs they
    trained, seconds per evaluated example over the examples whose batches were timed."""

    epochs: int = 0
    train_s: float = 0.0
    examples: int = 0
    eval_s: float = 0.0

    @property
    def per_epoch(self) -> float | None:
        return self.train_s / self.epochs if self.epochs else None

    @property
    def per_example(self) -> float | None:
        return self.eval_s / self.examples if self.examples else None


def row_name(t: TrialStatus) -> str:
    return params_text({k: v for k, v in t.params.items() if k != SEED_KEY}, sep=" ")


def measured_rates(trials: list[TrialStatus]) -> dict[str, RowRates]:
    """Each configuration's rates, from its trials (an unfinished evaluation's timed batches too)."""
    out: dict[str, RowRates] = {}
    for t in trials:
        r = out.setdefault(row_name(t), RowRates())
        if t.epochs and t.train_time_s:
            r.epochs += t.epochs
            r.train_s += t.train_time_s
        if t.eval_s > 0 and t.eval_timed:
            r.examples += t.eval_timed
            r.eval_s += t.eval_s
    return out


def time_left(trials: list[TrialStatus], rates: dict[str, RowRates], epochs: int,
              n_examples: int | None) -> tuple[float, list[str]]:
    """Trial-seconds an ablation has left at the rates its own trials measured (``rates``:
    :func:`measured_rates`), row by row (a row's seconds per epoch, and per evaluated example), and
    what that leaves out: the part of a row none of whose trials has measured it yet (so the sum is
    a lower bound until every row has)."""
    left, missing = 0.0, set()
    for t in trials:
        if t.state not in (RUNNING, WAITING):
            continue
        r = row_name(t)
        to_train = float(epochs - t.epochs)
        if t.progress and t.progress["phase"] == TRAINING:
            to_train -= int(t.progress["step"]) / max(1, int(t.progress["steps"]))
        if to_train > 0:
            if rates[r].per_epoch is not None:
                left += to_train * rates[r].per_epoch
            else:
                missing.add(f"the training of {r}")
        to_eval = (n_examples or 0) - t.eval_examples
        if to_eval > 0:
            if rates[r].per_example is not None:
                left += to_eval * rates[r].per_example
            else:
                missing.add(f"the evaluation of {r}")
    return left, sorted(missing)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def format_status(st: StudyStatus, resume_command: str | None = None) -> str:
    """``resume_command``: said when it is not running, if its last session left none of its own."""
    c = st.counts()
    resume_command = st.resume_command or resume_command
    lines = [f"study {st.study} ({st.kind}): {st.study_dir}"]
    if st.driver:
        lines.append(f"running now: process {st.driver.get('pid')} on {st.driver.get('host')} since "
                     f"{st.driver.get('since')}")
    elif st.sessions:
        lines.append("not running" + (f": `{resume_command}` goes on with it" if resume_command and
                                       c[WAITING] + c[RUNNING] + c[FAILED] else ""))
    else:
        lines.append("not started")
    lines.append(f"wall time {_hours(st.wall_time_s)} over {st.sessions} session(s); {st.planned} trials: "
                 + ", ".join(f"{n} {k}" for k, n in c.items() if n))
    if st.left_s is not None and (c[RUNNING] + c[WAITING]) and not st.left_s and st.not_counted:
        lines.append("left: not known yet (no trial has finished an epoch or timed an evaluation batch)")
    elif st.left_s is not None and (c[RUNNING] + c[WAITING]):
        text = (f"left at the rates its trials measured: {'at least ' if st.not_counted else 'about '}"
                f"{_hours(st.left_s / max(1, st.slots))} of wall time ({_hours(st.left_s)} of trial time, "
                f"{st.slots} at a time)")
        if st.not_counted:
            text += "; not counted (nothing measured yet): " + ", ".join(st.not_counted)
        lines.append(text)
    if any(r.epochs or r.examples for r in st.rates.values()):
        lines.append("measured so far, by configuration (the plan's probe predicted these: `ancra-tune plan`):")
        for name, r in st.rates.items():
            epoch = f"{r.per_epoch:,.0f} s per epoch ({r.epochs} epochs)" if r.per_epoch is not None else \
                "no epoch yet"
            example = f"{r.per_example:.2f} s per evaluated example ({r.examples:,} examples timed)" \
                if r.per_example is not None else "no evaluation timed yet"
            lines.append(f"  {name:<28} {epoch}; {example}")
    short = R.short_ids(t.trial_id for t in st.trials if t.trial_id)
    w = max([7, *map(len, short.values())])
    lines.append(f"  {'trial':<{w}} {'epochs':>6} {'training':>9}  {'params':<28} now")
    for t in st.trials:
        tid = short[t.trial_id] if t.trial_id else "-"
        shown = params_text(t.params, sep=" ") + f" seed={t.params.get(SEED_KEY, '-')}"
        epochs = f"{t.epochs}/{st.epochs}" if t.trial_id else "-"
        train = _hours(t.train_time_s) if t.train_time_s else "-"
        lines.append(f"  {tid:<{w}} {epochs:>6} {train:>9}  {shown:<28} {t.now}")
    return "\n".join(lines)
