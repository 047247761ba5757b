"""`ancra-tune eval --workers N`: batches sharded over Ray workers merge into the report a single
process gives on the same examples (AutoAttack included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.distributed_eval import shard_batches

ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_balanced_and_cover_every_batch() -> None:
    assert shard_batches(5, 2) == [[0, 2, 4], [1, 3]]
    assert shard_batches(2, 4) == [[0], [1]]  # never an empty shard
    for n, w in ((1, 1), (7, 3), (16, 5)):
        shards = shard_batches(n, w)
        assert sorted(b for s in shards for b in s) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_give_the_single_process_report(tmp_path: Path) -> None:
    from ancra_tune.config import TrainConfig
    from ancra_tune.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "data.dataset": "digits", "data.batch_size": 64, "data.train_limit": 256, "model.name": "small_cnn",
        "attack.steps": 2, "attack.eps": 0.3, "attack.step_size": 0.1, "eval.pgd_steps": 0, "optim.epochs": 2,
        "optim.lr": 0.05, "progress": False, "out_dir": str(tmp_path / "train")})
    Trainer(cfg).fit()
    ckpt = tmp_path / "train" / "checkpoint.pt"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = [sys.executable, "-m", "trainables.cli", "eval", str(ckpt), "--quick", "--n", "64", "--batch-size", "16",
              "--quiet"]
    reports = {}
    for name, extra in (("single", []), ("sharded", ["--workers", "2"])):
        out = subprocess.run(common + ["--out", str(tmp_path / name)] + extra, capture_output=True, text=True,
                             env=env, timeout=900, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    single, sharded = reports["single"], reports["sharded"]
    assert single["n_examples"] == 64 and any(a["kind"] == "autoattack" for a in single["attacks"])
    assert single["autoattack_acc"] is not None
    for r in (single, sharded):
        r.pop("artifacts", None)  # the PNGs' paths differ with --out
    assert sharded == single  # every attack's per-example outcome, the checks, the features
    for name in ("features_hist.png", "embedding.png"):
        assert (tmp_path / "sharded" / name).stat().st_size > 1000
