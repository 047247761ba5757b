"""The ``ancra-tune`` program's exit: quick, but nothing lost on the way out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PROGRAM = textwrap.dedent("""
    import sys, ray, trainables.cli.app as cli

    def command(argv=None):
        import concurrent.futures
        global pool
        pool = concurrent.futures.ThreadPoolExecutor(1)  # held, as MLflow and Tune hold theirs: an idle thread
        assert pool.submit(lambda: 1).result() == 1
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        print(ray._private.worker._global_node.get_session_dir_path(), file=sys.stderr, flush=True)
        print("x" * 300_000)  # more than a pipe holds: still in the buffer when the command returns
        print("the last line")
        return 3

    cli.main = command
    cli.entry()
""")


def _ray_processes(session: str) -> list[int]:
    """Live processes whose command line names this Ray session's folder (its GCS, raylet, agents)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if session in cmd and state != "Z":
                out.append(int(d.name))
    return out


def test_the_program_exits_with_its_code_its_whole_output_and_ray_shut_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a pipe
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    run = subprocess.run([sys.executable, "-c", PROGRAM], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=env)
    assert run.returncode == 3, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines == ["x" * 300_000, "the last line"], (len(run.stdout), run.stdout[-200:])
    session = next((line for line in run.stderr.splitlines() if "/session_" in line), "")
    assert session, run.stderr[-2000:]
    deadline = time.time() + 10  # processes Ray told to stop may take a moment to go
    while _ray_processes(session) and time.time() < deadline:
        time.sleep(0.2)
    assert _ray_processes(session) == []
