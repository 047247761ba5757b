"""The ``ancra-tune`` command line (see :mod:`.app`)."""

from .app import build_parser, entry, main  # noqa: F401
from .codes import EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE  # noqa: F401
from .study_commands import format_summary, study_exit_code  # noqa: F401
