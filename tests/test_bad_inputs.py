"""A careless newcomer's inputs: every bad file gets a clear message and exit code 2, never a
traceback; every path the tools print is one `ancra-tune eval` takes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ancra_tune.checkpoint import find_checkpoint
from trainables.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "quickstart", "--set", "optim.epochs=1", "--set", "data.train_limit=128", "--set",
                 "model.ra=false", "--out", str(out), "--quiet"]) == 0
    return out / "checkpoint.pt"


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


EVAL = ["--quick", "--n", "16", "--no-autoattack", "--quiet"]


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    f = tmp_path / "junk.pt"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails(["eval", str(f), *EVAL], capsys, "junk.pt", "is not a checkpoint")


class Payload:
    pass


def test_a_pickled_object_is_refused_and_never_loaded_unsafely(tmp_path: Path, capsys) -> None:
    f = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": Payload()}, f)
    err = _fails(["eval", str(f), *EVAL], capsys, "evil.pt", "is refused", "pickled Python objects")
    assert "weights_only=False" not in err and "weights_only" not in err


def test_a_checkpoint_whose_weights_do_not_fit_its_model(ckpt: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(ckpt, weights_only=True)
    other_arch = {**state, "config": {**state["config"], "model": {**state["config"]["model"], "name": "resnet18"}}}
    torch.save(other_arch, tmp_path / "arch.pt")
    _fails(["eval", str(tmp_path / "arch.pt"), *EVAL], capsys, "do not fit", "resnet18")
    other_classes = {**state, "data_info": {**state["data_info"], "num_classes": 5}}
    torch.save(other_classes, tmp_path / "classes.pt")
    _fails(["eval", str(tmp_path / "classes.pt"), *EVAL], capsys, "do not fit", "5 classes")


def test_a_transfer_source_for_another_task_is_refused(ckpt: Path, tmp_path: Path, capsys) -> None:
    mnist_like = tmp_path / "mnist_like"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", images=rng.integers(0, 255, (64, 12, 12, 1), dtype=np.uint8),
             labels=rng.integers(0, 4, 64))
    assert main(["train", "quickstart", "--set", "data.dataset=npz", "--set", f"data.train_file={tmp_path / 'm.npz'}",
                 "--set", "optim.epochs=1", "--set", "data.batch_size=16", "--set", "model.ra=false",
                 "--out", str(mnist_like), "--quiet"]) == 0
    _fails(["eval", str(ckpt), *EVAL, "--source", str(mnist_like)], capsys, "--source", "same task")


def test_bad_npz_files(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", images=rng.integers(0, 255, (32, 64), dtype=np.uint8), labels=np.zeros(32, int))
    _fails(["train", "--set", "data.dataset=npz", "--set", f"data.train_file={tmp_path / 'flat.npz'}", "--quiet"],
           capsys, "flat.npz", "images must be an array (N, H, W, C)", "(32, 64)")
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 255, (32, 8, 8, 1), dtype=np.uint8),
             labels=rng.integers(0, 3, 32))
    np.savez(tmp_path / "b.npz", images=rng.integers(0, 255, (32, 10, 10, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 32))
    _fails(["train", "--set", "data.dataset=npz", "--set", f"data.train_file={tmp_path / 'a.npz'}", "--set",
            f"data.test_file={tmp_path / 'b.npz'}", "--quiet"], capsys, "10x10 images with 3 channel(s)",
           "8x8 with 1")


def test_train_resume_with_nothing_to_resume_refuses(tmp_path: Path, capsys) -> None:
    _fails(["train", "quickstart", "--resume", "--out", str(tmp_path / "empty")], capsys, "nothing to resume")
    assert not (tmp_path / "empty").exists()


def test_every_printed_checkpoint_path_is_accepted(ckpt: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint file, its training folder, a Ray checkpoint folder, a trial folder holding several."""
    trial = tmp_path / "run_trial_0001"
    for i, final in ((1, False), (2, True), (3, False)):
        d = trial / "train-x" / f"checkpoint_00000{i}"
        d.mkdir(parents=True)
        shutil.copy(ckpt, d / "checkpoint.pt")
        if final:
            (d / "final.json").write_text("{}")
    assert find_checkpoint(ckpt) == ckpt
    assert find_checkpoint(ckpt.parent) == ckpt
    ray_dir = trial / "train-x" / "checkpoint_000003"
    assert find_checkpoint(ray_dir) == ray_dir / "checkpoint.pt"
    assert find_checkpoint(trial) == trial / "train-x" / "checkpoint_000002" / "checkpoint.pt"  # the finished one
    for path in (ckpt.parent, ray_dir, trial):
        assert main(["eval", str(path), *EVAL, "--out", str(tmp_path / "eval" / path.name)]) == 0
    assert "robustness card:" in capsys.readouterr().out
    assert (tmp_path / "eval" / trial.name / "robustness_card.png").stat().st_size > 10_000
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    _fails(["eval", str(empty), *EVAL], capsys, "no checkpoint.pt in")
