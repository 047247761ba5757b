"""A trial's status, as the study's summary, the console, the report and the trial's MLflow run
(tag ``ancra.status``) name it. (How a whole study ended is its outcome: :mod:`trainables.sessions`.)"""

from __future__ import annotations

FINISHED = "finished"  # trained and evaluated
STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
INTERRUPTED = "interrupted"  # cut short by Ctrl+C / SIGTERM / a full disk: --resume finishes it
DIVERGED = "diverged"  # its loss became NaN or infinite
ERROR = "error"  # it raised (its log is in its trial folder)
LOST = "lost"  # MLflow only: a run of a trial a killed driver started and Tune never saved

TRIAL_STATUSES = (FINISHED, STOPPED, INTERRUPTED, DIVERGED, ERROR)
