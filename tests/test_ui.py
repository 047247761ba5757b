"""The MLflow UI as a person sees it: headless Chromium on a quickstart study's runs list.

Marked ``browser`` (skipped without chromium + chromedriver) and ``ray`` (it runs the study).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_runs_list_shows_nested_trials_and_robust_columns(tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": uri}
    run = subprocess.run([sys.executable, "-m", "trainables.cli", "sweep", "search_spaces/quickstart.yaml",
                          "--smoke-test", "--storage", str(tmp_path / "studies"), "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "ui.png"
    shown = subprocess.run([sys.executable, "scripts/ui_screenshot.py", "--tracking-uri", uri, "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]

    seen = json.loads(shown.stdout[shown.stdout.index("{"):])
    for column in ("robust_acc_worst", "clean_acc", "val_robust_acc", "method.anc", "model.ra", "ancra.status",
                   "ancra.flagged", "check.final_output_not_masked"):
        assert column in seen["headers"], seen["headers"]
    trials = [name for name in seen["links"] if name.startswith("trial ")]
    assert "quickstart" in seen["links"] and len(trials) == 2  # the study and its two trials
    assert "viewStateShareKey=ancra" in seen["url"]
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
