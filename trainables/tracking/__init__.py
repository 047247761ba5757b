"""MLflow tracking on the client API: one parent run per study, one nested run per trial.

Ray's ``MLflowLoggerCallback`` does not nest runs and can duplicate them, so the platform
tracks on its own:

- the study driver creates (or, on ``--resume``, finds again) the parent run, with the study
  file, the resolved configuration and the Git commit;
- each Tune trial looks its child run up by ``ancra.trial_id`` under the parent before creating
  it, so a restarted trial or a resumed study never adds a second run;
- rank 0 of the Ray Train worker group logs each epoch's metrics with the epoch as the step,
  only for epochs the run does not have yet, and at the end the evaluation (metrics, check
  tags, report and plots) and the model, each at most once;
- the driver closes every child run with the trial's outcome (finished, stopped by ASHA,
  diverged, error) and logs the study summary to the parent.

With no settings, tracking goes to ``sqlite:///<cwd>/mlflow.db`` with artifacts in
``<cwd>/mlartifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` selects a real server.

Rooms: :mod:`.store` (where runs go), :mod:`.runs` (study and trial runs, epochs), :mod:`.models`
(a trial's evaluation and model), :mod:`.registry` (the best trial, ``champion``), :mod:`.ui`.
"""

from __future__ import annotations

from .models import (  # noqa: F401
    log_model,
    log_trial_folder,
    log_trial_result,
    run_is_complete,
)
from .registry import (  # noqa: F401
    Candidate,
    download_checkpoint,
    pick_best,
    rank_candidates,
    register_best,
    run_report,
    study_runs,
)
from .runs import (  # noqa: F401
    FAST_FAIL_ENV,
    LOST,
    EpochLogger,
    StudyTracking,
    TrialRecorder,
    TrialSpec,
    end_study_run,
    find_trial_run,
    merge_trial_runs,
    node_id,
    start_study_run,
    trial_run,
    trial_runs,
)
from .store import (  # noqa: F401
    CHAMPION,
    DEFAULT_ARTIFACTS,
    DEFAULT_DB,
    DEFAULT_METRIC,
    EXPERIMENT_KIND,
    FINAL_LOGGED,
    MODEL_URI,
    PARENT,
    REPORT_ARTIFACT,
    ROLE,
    STATUS,
    STUDY_PATH,
    TRIAL_ID,
    TrackingError,
    check_tracking,
    client,
    default_tracking_uri,
    ensure_experiment,
    git_commit,
    is_local,
    local_artifact_root,
    log_metrics,
    log_params,
    prepare_store,
    quote,
    resolve_tracking_uri,
    sqlite_path,
)
from .ui import (  # noqa: F401
    VIEW_COLUMNS,
    VIEW_KEY,
    serve_ui,
    share_view,
    study_url,
    wait_for_server,
)
