import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ancra_tune.checkpoint import load_model
from ancra_tune.config import TrainConfig
from ancra_tune.data import load_dataset
from ancra_tune.trainer import PARTIAL_NAME, Callback, DivergedError, PartialFile, Trainer, lr_at
from trainables.cli import main

DIGITS = {"data.dataset": "digits", "data.batch_size": 64, "data.val_size": 0.15, "model.name": "small_cnn",
          "attack.eps": 0.2, "attack.step_size": 0.05, "attack.steps": 3, "eval.pgd_step_size": 0.05,
          "eval.pgd_steps": 3, "eval.max_examples": 100, "optim.lr": 0.05, "progress": False,
          "method.negatives": "soft", "method.negatives_warmup_epochs": 1}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**DIGITS, "out_dir": str(tmp_path), **kw})


def test_lr_schedule_is_the_released_one() -> None:
    """The released script counts epochs from 1 and divides lr from epochs 75, 90 and 100:
    74/15/10/21 epochs at 1e-2/1e-3/1e-4/1e-5 (0-based epochs 0-73, 74-88, 89-98, 99-119)."""
    c = TrainConfig()
    assert [lr_at(c, e) for e in (0, 73, 74, 88, 89, 98, 99, 119)] == pytest.approx(
        [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    counts = Counter(round(lr_at(c, e), 8) for e in range(120))
    assert [counts[v] for v in (0.01, 1e-3, 1e-4, 1e-5)] == [74, 15, 10, 21]


def _released_step_by_hand(model, x, y, x_neg, y_neg, noise_oe, noise_ae, *, eps, step, steps, beta, zeta, gamma,
                           alpha):
    """One step of the released trades_train (train_CIFAR10_ResNet.py), written out from its text:
    the model's forward with _eval=True is eval mode with the predicted gate; _eval=False is train
    mode with the label gate. The OE attack (t_pgd) runs first, then the AE attack (u_pgd)."""
    def attack(x0, target, noise, sign):
        x_adv = x0 + noise
        for _ in range(steps):
            x_adv.requires_grad_(True)
            model.eval()
            out = model(x_adv)  # _eval=True: eval mode, RA gated by the prediction
            loss = F.cross_entropy(out.logits, target) + gamma * sum(
                F.cross_entropy(a, target) for a in out.aux_logits) / len(out.aux_logits)
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + sign * step * g.sign()
            x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0, 1)
        return x_adv

    oe = attack(x_neg, y, noise_oe, -1.0)  # t_pgd: toward the anchor's label
    ae = attack(x, y, noise_ae, 1.0)  # u_pgd
    model.train()
    n = x.shape[0]
    nat, adv, neg = model(x, y), model(ae, y), model(oe, y_neg)  # three train-mode forwards, own labels

    def kl_sum(logits_adv, logits_nat):
        return F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="sum")

    def anc(p_nat, p_neg):  # loss_fn_ori summed over rows where the predictions agree
        v1, i1 = p_nat.max(-1)
        v2, i2 = p_neg.max(-1)
        return ((v1 * v2).sqrt() * (i1 == i2)).sum()

    def anc_asym(p_nat, p_neg):
        return alpha * anc(p_nat.detach(), p_neg) + (1 - alpha) * anc(p_neg.detach(), p_nat)

    b = len(nat.aux_logits)
    loss_natural = F.cross_entropy(nat.logits, y) + gamma * sum(F.cross_entropy(a, y) for a in nat.aux_logits) / b
    loss_robust = kl_sum(adv.logits, nat.logits) / n + gamma * sum(
        kl_sum(a, c) / n for a, c in zip(adv.aux_logits, nat.aux_logits, strict=True)) / b
    sm = lambda t: F.softmax(t, 1)  # noqa: E731
    loss_t = anc_asym(sm(nat.logits), sm(neg.logits)) / n + gamma * sum(
        anc_asym(sm(a), sm(c)) / n for a, c in zip(nat.aux_logits, neg.aux_logits, strict=True)) / b
    return loss_natural + beta * loss_robust + zeta * loss_t


def test_one_step_equals_the_released_algorithm_by_hand(tmp_path: Path) -> None:
    """The default TRADES-ANCRA step (random negatives + targeted OEs, RA, alpha = 0.7 to use both
    halves of ANC) equals the released script's step written out by hand: the loss, every
    parameter's gradient, and the BatchNorm running statistics afterwards."""
    from ancra_tune.negatives import select_negatives
    from ancra_tune.step import ancra_step

    cfg = _cfg(tmp_path, **{"method.negatives": "random", "method.alpha": 0.7, "attack.steps": 3})
    t = Trainer(cfg)
    x, y = next(iter(t._loader()))
    x, y = x[:16], y[:16]
    ref_model = copy.deepcopy(t.model)
    gen = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(gen.get_state())
    sel = select_negatives(y, strategy="random", generator=replay)
    noise_oe = torch.randn(x.shape, generator=replay) * 0.001
    noise_ae = torch.randn(x.shape, generator=replay) * 0.001

    t.model.train()
    loss, parts = ancra_step(t.model, x, y, cfg=cfg, epoch=0, generator=gen)
    loss.backward()
    ref = _released_step_by_hand(ref_model, x, y, x[sel.index], y[sel.index], noise_oe, noise_ae,
                                 eps=cfg.attack.eps, step=cfg.attack.step_size, steps=3, beta=6.0, zeta=3.0,
                                 gamma=2.0, alpha=0.7)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, p), q in zip(t.model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(t.model.named_buffers(), ref_model.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # 3 train-mode forwards; the attacks left them alone
    assert int(t.model.stem[0][1].num_batches_tracked) == 3
    # The label gate leaks the label into P' in the loss (the released method): P' gated by y on
    # x^a is right far more often than the model as it predicts.
    assert parts["train_adv_acc_label_gate"] >= parts["train_adv_acc"]


def test_attack_options_batched_and_train_mode_batchnorm(tmp_path: Path) -> None:
    """Eval-mode BatchNorm: the batched AE+OE attack equals the released sequential one. Train-mode
    BatchNorm (an option) uses each attack batch's statistics and updates the running ones."""
    from ancra_tune.step import ancra_step

    base = {"method.negatives": "random", "attack.init": "none"}
    losses = {}
    for schedule in ("sequential", "batched"):
        cfg = _cfg(tmp_path, **base, **{"attack.schedule": schedule})
        t = Trainer(cfg)
        x, y = next(iter(t._loader()))
        losses[schedule] = ancra_step(t.model, x, y, cfg=cfg, epoch=0, generator=torch.Generator().manual_seed(1))[0]
    assert losses["sequential"].item() == pytest.approx(losses["batched"].item(), rel=1e-5)
    cfg = _cfg(tmp_path, **base, **{"attack.bn_mode": "train"})
    t = Trainer(cfg)
    x, y = next(iter(t._loader()))
    ancra_step(t.model, x, y, cfg=cfg, epoch=0, generator=torch.Generator().manual_seed(1))
    # 3 attack steps on the OEs + 3 on the AEs + 3 loss forwards
    assert int(t.model.stem[0][1].num_batches_tracked) == 9


def test_separate_forwards_differ_from_the_joint_one(tmp_path: Path) -> None:
    from ancra_tune.step import ancra_step

    out = {}
    for joint in (False, True):
        cfg = _cfg(tmp_path, **{"method.joint_forward": joint, "attack.init": "none", "method.negatives": "random"})
        t = Trainer(cfg)
        x, y = next(iter(t._loader()))
        out[joint] = ancra_step(t.model, x, y, cfg=cfg, epoch=0, generator=torch.Generator().manual_seed(2))[0]
        assert int(t.model.stem[0][1].num_batches_tracked) == (1 if joint else 3)
    assert out[True].item() != pytest.approx(out[False].item(), rel=1e-4)  # one BN batch of 3B changes the loss


def test_real_training_lowers_loss_and_raises_robust_accuracy(shared_data: Path, tmp_path: Path) -> None:
    """TRADES-ANCRA (targeted negatives, RA) on real MNIST: loss falls, robust accuracy rises."""
    cfg = TrainConfig.from_dict({
        "data.dataset": "npz", "data.train_file": str(shared_data / "mnist" / "train60000.npz"),
        "data.train_limit": 2000, "data.val_size": 1000, "data.batch_size": 100, "model.name": "small_cnn",
        "attack.eps": 0.1, "attack.step_size": 0.03, "attack.steps": 5, "eval.pgd_step_size": 0.03,
        "eval.pgd_steps": 5, "eval.max_examples": 200, "optim.epochs": 2, "optim.lr": 0.05,
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
    from ancra_tune.step import ancra_step
    first_batch_loss = ancra_step(trainer.model, x, y, cfg=cfg, epoch=0,
                                  generator=torch.Generator().manual_seed(0))[0].item()
    after = trainer.fit()
    assert [m["epoch"] for m in seen] == [0.0, 1.0]
    assert seen[-1]["loss"] < seen[0]["loss"] < first_batch_loss
    assert after["val_clean_acc"] > 0.8 > before["val_clean_acc"] + 0.5
    assert after["val_pgd_acc_final"] > before["val_pgd_acc_final"] + 0.4
    assert after["val_pgd_acc_aux"] > before["val_pgd_acc_aux"] + 0.4
    # The released training accuracy (the model as it predicts) vs P' gated by the label (the leak).
    assert after["train_adv_acc_label_gate"] > 0.95 and after["train_adv_acc"] < after["train_adv_acc_label_gate"]
    assert after["loss_anc"] >= 0 and 0 <= after["neg_fallback_rate"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0.0, 1.0]


class _KillAfterEpoch(Callback):
    """Kills the run right after epoch ``epoch``'s checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics, checkpoint):
        if epoch == self.epoch and checkpoint is not None and checkpoint.is_file():
            raise KeyboardInterrupt


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    splits = load_dataset(_cfg(tmp_path).data)
    straight = Trainer(_cfg(tmp_path / "a", **{"optim.epochs": 3}), splits=splits)
    straight.fit()
    # Killed after its second epoch's checkpoint, then a new trainer resumes for the last one.
    first = Trainer(_cfg(tmp_path / "b", **{"optim.epochs": 3}), splits=splits, callbacks=[_KillAfterEpoch(1)])
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


class _KilledAfter(PartialFile):
    """A mid-epoch checkpoint file whose run is killed right after its ``n``-th write."""

    def __init__(self, path: Path, n: int) -> None:
        super().__init__(path)
        self.n, self.writes = n, 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        if self.writes == self.n:
            raise KeyboardInterrupt


def _same_weights(a: Trainer, b: Trainer) -> None:
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), k  # bit for bit
    for (k, x), y in zip(a.optimizer.state_dict()["state"].items(), b.optimizer.state_dict()["state"].values(),
                         strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"]), k


def _training_numbers(history: list[dict]) -> list[dict]:
    timed = ("epoch_time_s", "train_images_per_s", "val_time_s", "resumed_at_step")
    return [{k: v for k, v in h.items() if k not in timed} for h in history]


@pytest.mark.parametrize("kill_at", [2, 4])  # mid-epoch 1; mid-epoch 2 (after epoch 1's checkpoint)
def test_a_run_killed_mid_epoch_resumes_at_its_step_exactly(tmp_path: Path, kill_at: int) -> None:
    """With RA, ANC's soft negatives and random attack starts: killed right after a mid-epoch
    checkpoint, a new trainer goes on from that step, and ends with the weights, momentum and
    per-epoch numbers of a run never stopped, bit for bit."""
    kw = {"optim.epochs": 2, "model.ra": True, "checkpoint_every_s": 1e-9}  # due at every 10th step
    splits = load_dataset(_cfg(tmp_path).data)
    straight = Trainer(_cfg(tmp_path / "a", **kw), splits=splits)
    straight.fit()
    assert not (tmp_path / "a" / PARTIAL_NAME).exists()  # removed once its epoch's checkpoint is out

    steps = len(straight._loader())
    assert steps > 11  # two mid-epoch checkpoints an epoch (after steps 1 and 11)
    first = Trainer(_cfg(tmp_path / "b", **kw), splits=splits,
                    partial=_KilledAfter(tmp_path / "b" / PARTIAL_NAME, kill_at))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state = torch.load(tmp_path / "b" / PARTIAL_NAME, weights_only=True)
    assert (state["epoch"], state["step"]) == ((0, 11) if kill_at == 2 else (1, 11))
    resumed = Trainer(_cfg(tmp_path / "b", **kw), splits=splits)
    resumed.fit(resume=True)
    _same_weights(straight, resumed)
    assert _training_numbers(resumed.history) == _training_numbers(straight.history)
    # The resumed epoch says where it was taken up; the others, and the straight run's, do not.
    assert [h.get("resumed_at_step") for h in resumed.history] == ([11.0, None] if kill_at == 2 else [None, 11.0])
    assert all("resumed_at_step" not in h for h in straight.history)
    assert not (tmp_path / "b" / PARTIAL_NAME).exists()


def test_each_mid_epoch_checkpoint_tells_the_callbacks_its_step(tmp_path: Path) -> None:
    """Rank 0's callbacks hear of each mid-epoch checkpoint (its epoch, step and the epoch's steps), as
    written; a Ray trial's progress file then says where the run is."""
    import pyarrow.fs

    from trainables.progress import ProgressFile, TrainingProgress, describe

    class Saved(PartialFile):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.saved: list[tuple[int, int]] = []

        def save(self, state: dict) -> None:
            super().save(state)
            self.saved.append((state["epoch"], state["step"]))

    class Told(Callback):
        def __init__(self) -> None:
            self.told: list[tuple[int, int, int]] = []

        def on_mid_epoch_checkpoint(self, trainer, epoch, step, steps):
            self.told.append((epoch, step, steps))

    told, store = Told(), Saved(tmp_path / PARTIAL_NAME)
    progress = ProgressFile(pyarrow.fs.LocalFileSystem(), str(tmp_path))
    trainer = Trainer(_cfg(tmp_path, **{"optim.epochs": 2, "checkpoint_every_s": 1e-9}), partial=store,
                      callbacks=[told, TrainingProgress(progress)])
    trainer.fit()
    steps = len(trainer._loader())
    assert len(store.saved) >= 4 and told.told == [(e, s, steps) for e, s in store.saved]
    assert all(0 < s < steps for _, s in store.saved)
    last = progress.read()
    assert last is not None and (last["epoch"], last["epochs"], last["step"], last["steps"]) == \
        (store.saved[-1][0] + 1, 2, store.saved[-1][1], steps)
    assert describe(last).startswith(f"epoch 2/2: step {store.saved[-1][1]} of {steps} (")


def test_two_ddp_workers_killed_mid_epoch_resume_at_their_step_exactly(tmp_path: Path) -> None:
    """Two gloo workers, each with its own random stream and half of every batch: a mid-epoch
    checkpoint keeps every rank's stream and sums; resumed, the run ends with the weights and
    numbers of the same two workers never stopped."""
    import torch.multiprocessing as mp
    from helpers import ddp_mid_epoch_run

    kw = {**DIGITS, "optim.epochs": 2, "model.ra": True, "checkpoint_every_s": 1e-9}
    finals = {}
    for name, kills in (("straight", [0]), ("killed", [3, 0])):  # killed in epoch 2, after its step 1
        out = tmp_path / name
        out.mkdir()
        for i, kill in enumerate(kills):
            mp.spawn(ddp_mid_epoch_run, nprocs=2, join=True,
                     args=(2, str(tmp_path / f"{name}-{i}.init"), {**kw, "out_dir": str(out)}, str(out), kill))
        finals[name] = torch.load(out / "final.pt", weights_only=True)
    straight, resumed = finals["straight"], finals["killed"]
    assert straight["resumed_at"] == [0, 0] and resumed["resumed_at"] == [1, 1]  # epoch 2, its step 1
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert _training_numbers(resumed["history"]) == _training_numbers(straight["history"])


def test_a_mid_epoch_checkpoint_of_another_epoch_or_configuration_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kw = {"optim.epochs": 2, "checkpoint_every_s": 1e-9}
    splits = load_dataset(_cfg(tmp_path).data)
    first = Trainer(_cfg(tmp_path, **kw), splits=splits, partial=_KilledAfter(tmp_path / PARTIAL_NAME, 2))
    with pytest.raises(KeyboardInterrupt):
        first.fit()  # killed in epoch 1, at step 11: no epoch checkpoint yet
    other = Trainer(_cfg(tmp_path, **kw, **{"method.alpha": 0.5}), splits=splits)
    with caplog.at_level("WARNING"):
        assert not other.resume_partial()
    assert "different configuration" in caplog.text
    later = Trainer(_cfg(tmp_path, **kw), splits=splits)
    later.start_epoch = 1  # as if epoch 1's checkpoint had been loaded: the file is of epoch 1, stale
    with caplog.at_level("WARNING"):
        assert not later.resume_partial()
    assert "it is of epoch 1, the run resumes at epoch 2" in caplog.text
    same = Trainer(_cfg(tmp_path, **kw), splits=splits)
    assert same.resume_partial() and same._partial_state is not None and same._partial_state["step"] == 11
    (tmp_path / PARTIAL_NAME).write_bytes(b"torn")  # unreadable: the run starts its epoch over
    assert not Trainer(_cfg(tmp_path, **kw), splits=splits).resume_partial()


def test_no_mid_epoch_checkpoint_when_switched_off_or_not_yet_due(tmp_path: Path) -> None:
    splits = load_dataset(_cfg(tmp_path).data)
    for every in (0, 3600):
        store = _KilledAfter(tmp_path / str(every) / PARTIAL_NAME, 1)
        Trainer(_cfg(tmp_path / str(every), **{"optim.epochs": 1, "checkpoint_every_s": every}), splits=splits,
                partial=store).fit()
        assert store.writes == 0
    with pytest.raises(ValueError, match="checkpoint_every_s must be >= 0"):
        _cfg(tmp_path, checkpoint_every_s=-1)


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path, **{"optim.epochs": 1})).fit()
    other = Trainer(_cfg(tmp_path, **{"optim.epochs": 1, "method.alpha": 0.5}))
    with pytest.raises(ValueError, match="different configuration"):
        other.resume()


def _npz(path: Path, splits, *, flip_label: bool = False) -> Path:
    """The digits' training examples as an npz file (what a study reads with ``data.train_file``)."""
    import numpy as np

    images = splits.train.images.permute(0, 2, 3, 1).numpy()
    labels = splits.train.labels.numpy().copy()
    if flip_label:
        labels[7] = (labels[7] + 1) % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    return path


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_a_checkpoint_resumes_where_its_data_moved_but_not_on_other_data(tmp_path: Path, mid_epoch: bool) -> None:
    """A checkpoint records its training data's digest: the same examples read from another folder
    (a study carried to another machine) resume; a file there that differs by one label does not.
    A checkpoint without a digest (written before) still needs the data where it was."""
    splits = load_dataset(_cfg(tmp_path).data)
    here, there = _npz(tmp_path / "a" / "train.npz", splits), _npz(tmp_path / "b" / "train.npz", splits)
    other = _npz(tmp_path / "c" / "train.npz", splits, flip_label=True)
    kw = {"data.dataset": "npz", "data.val_size": 0, "data.train_limit": 256, "optim.epochs": 2}
    if mid_epoch:
        kw["checkpoint_every_s"] = 1e-9
    run = tmp_path / "run"
    first = Trainer(_cfg(run, **kw, **{"data.train_file": str(here)}),
                    partial=_KilledAfter(run / PARTIAL_NAME, 1) if mid_epoch else None,
                    callbacks=[] if mid_epoch else [_KillAfterEpoch(0)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    name = PARTIAL_NAME if mid_epoch else "checkpoint.pt"
    state = torch.load(run / name, weights_only=True)
    assert state["data_digest"] == first.splits.train.digest()

    def resumes(train_file: Path) -> bool:
        t = Trainer(_cfg(run, **kw, **{"data.train_file": str(train_file)}))
        return t.resume_partial() if mid_epoch else t.resume()

    assert resumes(there)
    if mid_epoch:  # a mid-epoch checkpoint of other data is set aside with a warning, not used
        assert not resumes(other)
    else:
        with pytest.raises(ValueError, match="training data differs"):
            resumes(other)
    # Written before checkpoints recorded a digest: the data's location must be the same.
    state.pop("data_digest")
    torch.save(state, run / name)
    assert resumes(here)
    if mid_epoch:
        assert not resumes(there)
    else:
        with pytest.raises(ValueError, match="data settings differ"):
            resumes(there)


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
