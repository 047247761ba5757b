import json
from pathlib import Path

import pytest
import torch

from ancra_tune.checkpoint import load_model
from ancra_tune.cli import main
from ancra_tune.config import TrainConfig
from ancra_tune.data import load_dataset
from ancra_tune.trainer import Callback, DivergedError, Trainer, lr_at

DIGITS = {"data.dataset": "digits", "data.batch_size": 64, "data.val_size": 0.15, "model.name": "small_cnn",
          "attack.eps": 0.2, "attack.step_size": 0.05, "attack.steps": 3, "eval.pgd_step_size": 0.05,
          "eval.pgd_steps": 3, "eval.max_examples": 100, "optim.lr": 0.05, "progress": False,
          "method.negatives": "soft", "method.negatives_warmup_epochs": 1}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**DIGITS, "out_dir": str(tmp_path), **kw})


def test_lr_schedule_is_the_papers_scaled() -> None:
    c = TrainConfig()
    assert [lr_at(c, e) for e in (0, 74, 75, 89, 90, 99, 100, 119)] == pytest.approx(
        [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_real_training_lowers_loss_and_raises_robust_accuracy(shared_data: Path, tmp_path: Path) -> None:
    """TRADES-ANCRA (targeted negatives, RA) on real MNIST: loss falls, robust accuracy rises."""
    cfg = TrainConfig.from_dict({
        "data.dataset": "npz", "data.train_file": str(shared_data / "mnist" / "train60000.npz"),
        "data.train_limit": 2000, "data.val_size": 1000, "data.batch_size": 100, "model.name": "small_cnn",
        "attack.eps": 0.1, "attack.step_size": 0.03, "attack.steps": 5, "eval.pgd_step_size": 0.03,
        "eval.pgd_steps": 5, "eval.max_examples": 300, "optim.epochs": 2, "optim.lr": 0.05,
        "optim.milestones": [1.0], "progress": False, "out_dir": str(tmp_path)})
    trainer = Trainer(cfg)
    before = trainer.validate()
    seen: list[dict] = []

    class Record(Callback):
        def on_epoch_end(self, trainer, epoch, metrics, checkpoint):
            assert checkpoint is not None and checkpoint.is_file()
            seen.append(metrics)

    trainer.callbacks.append(Record())
    first_batch_loss = None
    x, y = next(iter(trainer._loader()))
    from ancra_tune.trainer import ancra_step
    first_batch_loss = ancra_step(trainer.model, x, y, cfg=cfg, epoch=0,
                                  generator=torch.Generator().manual_seed(0))[0].item()
    after = trainer.fit()
    assert [m["epoch"] for m in seen] == [0.0, 1.0]
    assert seen[-1]["loss"] < seen[0]["loss"] < first_batch_loss
    assert after["val_clean_acc"] > 0.8 > before["val_clean_acc"] + 0.5
    assert after["val_pgd_acc_final"] > before["val_pgd_acc_final"] + 0.4
    assert after["val_pgd_acc_aux"] > before["val_pgd_acc_aux"] + 0.4
    assert after["loss_anc"] >= 0 and 0 <= after["neg_fallback_rate"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0.0, 1.0]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    splits = load_dataset(_cfg(tmp_path).data)
    straight = Trainer(_cfg(tmp_path / "a", **{"optim.epochs": 3}), splits=splits)
    straight.fit()
    # Killed after its second epoch's checkpoint, then a new trainer resumes for the last one.
    class Kill(Callback):
        def on_epoch_end(self, trainer, epoch, metrics, checkpoint):
            if epoch == 1 and checkpoint is not None and checkpoint.is_file():
                raise KeyboardInterrupt

    first = Trainer(_cfg(tmp_path / "b", **{"optim.epochs": 3}), splits=splits, callbacks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = Trainer(_cfg(tmp_path / "b", **{"optim.epochs": 3}), splits=splits)
    assert resumed.resume() and resumed.start_epoch == 2
    resumed.fit()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert len(resumed.history) == 3
    # The checkpoint holds tensors and builtins only: it loads with weights_only=True.
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path, **{"optim.epochs": 1})).fit()
    other = Trainer(_cfg(tmp_path, **{"optim.epochs": 1, "method.alpha": 0.5}))
    with pytest.raises(ValueError, match="different configuration"):
        other.resume()


def test_divergence_is_reported_with_its_epoch(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, **{"optim.lr": 1e12, "optim.epochs": 2}))
    with pytest.raises(DivergedError) as e:
        trainer.fit()
    assert e.value.epoch == 0


def test_deployment_ra_loads_standard_weights(tmp_path: Path) -> None:
    """Fig. 7: a model trained without RA, loaded into the same architecture with RA on."""
    t = Trainer(_cfg(tmp_path, **{"optim.epochs": 1, "model.ra": False, "method.anc": False,
                                  "method.base_loss": "pgd_at"}))
    t.fit()
    std, cfg, _ = load_model(tmp_path / "checkpoint.pt")
    dep, _, _ = load_model(tmp_path / "checkpoint.pt", ra=True)
    assert not std.ra and dep.ra and not cfg.model.ra
    x = t.splits.val.images[:16].float() / 255
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(std(x).logits, t.model(x).logits)
        out = dep(x)
        # RA by hand on the standard network: the last block's weighted feature feeds fc.
        z = dep.stem(dep.normalize(x))
        z = dep.last_stage[0](z)
        gate0 = dep.fc(dep.readout(z)).argmax(1)
        z = dep.last_stage[1](z * dep.fc.weight[gate0][:, :, None, None])
        feat = dep.readout(z)
        expected = dep.fc(feat * dep.fc.weight[dep.fc(feat).argmax(1)])
    torch.testing.assert_close(out.logits, expected)
    assert len(out.aux_logits) == 2


def test_cli_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "quickstart", "--set", "optim.epochs=1", "--set", "method.zeta=1.5", "--out", str(out),
               "--quiet"])
    assert rc == 0
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    _, cfg, _ = load_model(out / "checkpoint.pt")
    assert cfg.method.zeta == 1.5 and cfg.data.dataset == "digits"
    assert "checkpoint" in capsys.readouterr().out
    rc = main(["train", "quickstart", "--set", "method.alpha=2", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "method.alpha" in err and "[0, 1]" in err
