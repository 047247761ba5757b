"""ASHA that remembers: its rung records and the trials it stopped survive ``--resume``.

Ray Tune restores trials and the searcher of an interrupted study, not the scheduler: a fresh
ASHA would compare the resumed trials against empty rungs and stop other trials than an
uninterrupted study does. This one writes its state (rung records and stopped trials, as JSON, so
nothing is unpickled from storage) into the study folder's ``study_state/`` after every decision
and reads it back.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from . import storage

#: inside the study folder's ``study_state/`` (see :mod:`trainables.storage` for why not beside Tune's files)
STATE_NAME = "scheduler.json"
#: where versions before 0.1.1 kept it, beside Tune's files (read once, then migrated)
LEGACY_NAME = "scheduler_state.json"


def state_path(study_dir: str) -> str:
    return storage.state_path(study_dir, STATE_NAME)


def read_state(study_dir: str) -> dict[str, Any] | None:
    """The scheduler's saved state of the study in ``study_dir`` (or of an older version's layout)."""
    state = storage.read_json(state_path(study_dir))
    if state is None:
        state = storage.read_json(storage.join(study_dir, LEGACY_NAME))
    return state if isinstance(state, dict) else None


class LastEpochASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch. Ray's ASHA has a rung at ``max_t`` itself
    and may stop a trial there, after all its training and before its end-of-trial evaluation,
    the result the study is run for; here the last epoch is recorded in that rung (later trials are
    still compared with it) and the trial goes on to its evaluation."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


class PersistentASHA(LastEpochASHA):
    """:class:`ASHAScheduler` whose decisions survive an interruption (see the module doc)."""

    def __init__(self, *, study_dir: str, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.study_dir = study_dir
        self.stopped: list[str] = []
        if resume:
            self._load()
        else:
            self._save()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune's --resume unpickles the scheduler as it was created (empty rungs): read back what it
        # decided since then.
        if "study_dir" not in state:  # pickled by a version that kept its state beside Tune's files
            legacy = state.pop("state_path")
            state["study_dir"] = legacy[: -len(LEGACY_NAME)].rstrip("/")
        self.__dict__.update(state)
        self._load()

    def _load(self) -> None:
        state = read_state(self.study_dir)
        if state is None:
            return
        for bracket, rungs in zip(self._brackets, state["brackets"], strict=True):
            for (milestone, recorded), saved in zip(bracket._rungs, rungs, strict=True):
                if float(saved["milestone"]) != float(milestone):
                    raise ValueError(f"{state_path(self.study_dir)} was written by another ASHA configuration")
                recorded.clear()
                recorded.update(saved["recorded"])
        self.stopped = list(state["stopped"])
        self._num_stopped = len(self.stopped)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        # A trial restored by --resume may reach here without having been added again.
        self._trial_info.setdefault(trial.trial_id, self._brackets[0])
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.trial_id not in self.stopped:
            self.stopped.append(trial.trial_id)
        if self._time_attr in result and self._metric in result:
            self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._trial_info.setdefault(trial.trial_id, self._brackets[0])
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def state(self) -> dict[str, Any]:
        return {"brackets": [[{"milestone": m, "recorded": dict(rec)} for m, rec in b._rungs] for b in self._brackets],
                "stopped": self.stopped}

    def _save(self) -> None:
        storage.write_text(state_path(self.study_dir), json.dumps(self.state()))
