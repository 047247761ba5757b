"""`ancra-tune eval --workers N`: batches spread over Ray workers merge into the report a single
process gives on the same examples (AutoAttack included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
    common = [sys.executable, "-m", "trainables.cli", "eval", str(ckpt), "--quick", "--n", "64", "--batch-size", "8",
              "--quiet"]
    reports = {}
    out = subprocess.run(common + ["--out", str(tmp_path / "single")], capture_output=True, text=True, env=env,
                         timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    reports["single"] = json.loads((tmp_path / "single" / "report.json").read_text())
    # Over two workers, stopped (Ctrl+C) once a batch is kept, then the same command: it goes on from
    # the kept batches and writes the report one process writes.
    sharded = common + ["--out", str(tmp_path / "sharded"), "--workers", "2"]
    kept = tmp_path / "sharded" / "eval_batches"
    proc = subprocess.Popen(sharded, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 600
    while proc.poll() is None and not list(kept.glob("batch_*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert f"its finished batches are kept in {kept}" in err
    n_kept = len(list(kept.glob("batch_*.pt")))
    assert 1 <= n_kept < 8, n_kept  # 64 examples in batches of 8
    out = subprocess.run(sharded, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"going on from the evaluation kept in {kept}: {n_kept} of 8 batches done" in out.stdout
    assert not kept.exists()
    reports["sharded"] = json.loads((tmp_path / "sharded" / "report.json").read_text())
    single, sharded = reports["single"], reports["sharded"]
    assert single["n_examples"] == 64 and any(a["kind"] == "autoattack" for a in single["attacks"])
    assert single["autoattack_acc"] is not None
    for r in (single, sharded):
        r.pop("artifacts", None)  # the PNGs' paths differ with --out
    assert sharded == single  # every attack's per-example outcome, the checks, the features
    for name in ("features_hist.png", "embedding.png"):
        assert (tmp_path / "sharded" / name).stat().st_size > 1000


def test_a_trial_stopped_mid_evaluation_goes_on_from_its_next_batch(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-trial evaluation keeps each batch as it finishes (in the trial's folder, through a
    pyarrow filesystem): stopped after two of four batches, the next start evaluates only the other
    two and reports what an evaluation never stopped reports; another model starts over; the
    kept batches go once the evaluation is reported."""
    import pyarrow.fs

    import ancra_tune.robustness.kept as kept_mod
    from ancra_tune.config import TrainConfig
    from ancra_tune.robustness import SuiteConfig
    from ancra_tune.robustness.report import BatchResult
    from ancra_tune.trainer import Trainer
    from trainables.progress import ProgressFile, describe
    from trainables.study_status import _kept_batches
    from trainables.trial_eval import EvalBatches, evaluate_trial

    cfg = TrainConfig.from_dict({
        "data.dataset": "digits", "data.batch_size": 64, "data.train_limit": 256, "model.name": "small_cnn",
        "model.ra": True, "attack.steps": 2, "attack.eps": 0.2, "attack.step_size": 0.1, "eval.pgd_steps": 0,
        "optim.epochs": 1, "optim.lr": 0.05, "progress": False, "out_dir": str(tmp_path / "train")})
    trainer = Trainer(cfg)
    trainer.fit()
    suite = SuiteConfig(eps=0.2, pgd_steps=3, cw_steps=3, mim_steps=3, adaptive_steps=3, sweep_steps=3, apgd_iters=3,
                        apgd_targets=2, square_queries=20, autoattack=None, batch_size=16, n_examples=64,
                        check_examples=32)
    straight = evaluate_trial(trainer, suite)

    calls: list[list[int]] = []
    evaluate = kept_mod.evaluate_model

    def counted(*args, **kwargs):
        calls.append(list(kwargs["batches"]))
        if len(calls) == 3 and stop_at_third:
            raise KeyboardInterrupt  # stopped while its third batch ran
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(kept_mod, "evaluate_model", counted)
    store = EvalBatches(pyarrow.fs.LocalFileSystem(), str(tmp_path / "trial" / "eval_batches"))
    stop_at_third = True
    with pytest.raises(KeyboardInterrupt):
        evaluate_trial(trainer, suite, batches=store)
    kept = sorted(p.name for p in (tmp_path / "trial" / "eval_batches").iterdir())
    assert kept == ["batch_00000.pt", "batch_00001.pt", "meta.json"]
    # Kept as plain tensors and builtins.
    state = torch.load(tmp_path / "trial" / "eval_batches" / "batch_00001.pt", weights_only=True)
    assert BatchResult.from_state(state["result"]).batch_idx == 1

    kept_s = sum(torch.load(tmp_path / "trial" / "eval_batches" / f"batch_0000{b}.pt", weights_only=True)["seconds"]
                 for b in (0, 1))
    # Between the starts `ancra-tune status` counts the kept batches.
    assert _kept_batches(store.fs, str(tmp_path / "trial"))[0].startswith(
        "evaluation: 2 of 4 batches kept (32 of 64 examples; the last at ")
    stop_at_third, calls[:] = False, []
    spent: dict[str, float] = {}
    told: list[tuple] = []
    progress = ProgressFile(store.fs, str(tmp_path / "trial"))

    def on_batch(*args) -> None:
        told.append(args)
        progress.evaluating(*args)

    resumed = evaluate_trial(trainer, suite, batches=store, spent=spent, on_batch=on_batch)
    assert calls == [[2], [3]] and spent["batches_resumed"] == 2
    assert spent["attacks_s"] > kept_s > 0  # the evaluation's time counts the earlier start's batches
    # How far it is, at its start and after each batch: batches, of, examples, of, seconds, resumed.
    assert [t[:4] + t[5:] for t in told] == [(2, 4, 32, 64, 2, 32), (3, 4, 48, 64, 2, 48), (4, 4, 64, 64, 2, 64)]
    assert told[0][4] == pytest.approx(kept_s) and told[-1][4] == pytest.approx(spent["attacks_s"])
    assert told[0][4] < told[1][4] < told[2][4]
    assert describe(progress.read()).startswith("evaluation: 4 of 4 batches (64 of 64 examples) in ")

    # A batch kept by d923040 (its outcomes without its time): taken as it is, its examples not timed.
    first = tmp_path / "trial" / "eval_batches" / "batch_00000.pt"
    torch.save(torch.load(first, weights_only=True)["result"], first)
    calls[:], told[:] = [], []
    again: dict[str, float] = {}
    assert evaluate_trial(trainer, suite, batches=store, spent=again, on_batch=on_batch).to_dict() == \
        straight.to_dict()
    assert calls == [] and again["batches_resumed"] == 4 and again["batches_untimed"] == 1
    assert [t[:4] + t[5:] for t in told] == [(4, 4, 64, 64, 4, 48)] and told[0][4] < spent["attacks_s"]
    assert ", about" not in describe(progress.read()) and "for the 48 timed" in describe(progress.read())
    assert resumed.to_dict() == straight.to_dict()  # every attack's per-example outcome, the checks
    assert straight.to_dict()["n_examples"] == 64

    # Another model (one more epoch): the kept batches are not its own, every batch is evaluated.
    trainer.cfg = trainer.cfg.replace(**{"optim.epochs": 2})
    trainer.fit()
    calls[:] = []
    evaluate_trial(trainer, suite, batches=store)
    assert calls == [[0], [1], [2], [3]]
    store.remove()
    assert not (tmp_path / "trial" / "eval_batches").exists()
