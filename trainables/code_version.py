"""Which code ran, and where: the Git commit of a path's repository, of the platform's own code, and the
machine.

A study that runs over many sessions may run at more than one commit (a fix landed between two
sessions); each session records the commit of the code it ran (:func:`running_code`), so the page
of its answer can say which code produced it, not only which commit built the page.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "ancra-tune"


def git_commit(path: str | Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the repository holding ``path``, or None outside Git. Dirty: tracked files
    differ from the commit."""
    d = Path(path).resolve()
    d = d if d.is_dir() else d.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=d,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def running_code() -> dict[str, Any]:
    """The code this process runs: the commit of the repository its ``trainables`` package was
    imported from (None for an installed copy outside Git), whether that tree had uncommitted
    changes, and the installed distribution's version."""
    try:
        version: str | None = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    commit = git_commit(Path(__file__).parent)
    return {"commit": commit[0] if commit else None, "dirty": commit[1] if commit else None, "version": version}


def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform says), or None."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def this_machine() -> dict[str, Any]:
    """Where this process runs: host, architecture, CPUs (their model: two machines of one name and
    size may compute differently, float for float), the first GPU (None: none) and torch's version."""
    import os
    import platform
    import socket

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "arch": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(), "gpu": gpu, "torch": torch.__version__}


def describe_machine(m: dict[str, Any] | None) -> str:
    if not m:
        return "not recorded"
    cpus = f"{m.get('cpus')} CPUs" + (f" {m['cpu_model']}" if m.get("cpu_model") else "")
    torch = f", torch {m['torch']}" if m.get("torch") else ""
    return f"{m.get('host')} ({m.get('arch')}, {cpus}, GPU {m.get('gpu') or 'none'}{torch})"


def tag(code: dict[str, Any] | None) -> str:
    """The code in a word, for a tag or a list: ``abc1234``, ``abc1234+dirty``, ``ancra-tune 0.1.0``."""
    code = code or {}
    if code.get("commit"):
        return code["commit"][:7] + ("+dirty" if code.get("dirty") else "")
    return f"{PACKAGE} {code.get('version') or 'unknown'}"


def describe(code: dict[str, Any] | None) -> str:
    """``abc1234`` / ``abc1234 with uncommitted changes`` / ``ancra-tune 0.1.0 (not in Git)`` /
    ``not recorded``."""
    if not code:
        return "not recorded"
    if code.get("commit"):
        return f"`{code['commit'][:7]}`" + (" with uncommitted changes" if code.get("dirty") else "")
    return f"{PACKAGE} {code.get('version') or '(version unknown)'} (not in Git)"
