"""Exit codes of every ``ancra-tune`` command (README: "Exit codes")."""

#: done; failed (a study without a finished
#: trial, a full disk, a diverged training run); usage or configuration error; interrupted
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
