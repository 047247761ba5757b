import json
from pathlib import Path

import pytest
import torch
from helpers import digits_splits, trained_digits_model

from ancra_tune.attacks import project
from ancra_tune.robustness import (
    AttackSpec,
    BatchResult,
    SuiteConfig,
    build_report,
    evaluate_model,
    feature_pairs,
    plan_attacks,
    run_attack,
)
from ancra_tune.robustness.suite import SURROGATES, AttackKind

EPS = 0.15


@pytest.fixture(scope="module")
def batch():
    s = digits_splits()
    return s.val.images[:128].float() / 255, s.val.labels[:128]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).logits.argmax(1) == y).float().mean().item()


def _specs(ra: bool):
    cfg = SuiteConfig(eps=EPS, pgd_steps=10, cw_steps=10, mim_steps=10, adaptive_steps=10, apgd_iters=10,
                      apgd_targets=3, square_queries=300, autoattack=None, transfer_steps=10, sweep_eps=(EPS,))
    return cfg, [s for s in plan_attacks(cfg, ra=ra, has_source=True) if s.kind != "sweep"]


@pytest.mark.parametrize("ra", [False, True])
def test_every_attack_stays_in_the_ball_and_beats_noise(batch, ra) -> None:
    model = trained_digits_model(ra=ra)
    source = trained_digits_model(adversarial=False)
    x, y = batch
    noise = project(x + torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 * EPS - EPS,
                    x, EPS)
    noise_acc = _acc(model, noise, y)
    cfg, specs = _specs(ra)
    kinds = {s.kind for s in specs}
    assert {"fgsm", "pgd", "cw", "mim", "square", "transfer_pgd", "transfer_mim"} <= kinds
    assert ra == any(s.target == "softgate" for s in specs)
    assert ra == ({"apgd-ce", "apgd-t"} <= kinds)
    for i, spec in enumerate(specs):
        x_adv = run_attack(spec, i, model, x, y, cfg=cfg, batch_idx=0, source=source)
        assert (x_adv - x).abs().max() <= EPS + 1e-6, spec.name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, spec.name
        assert _acc(model, x_adv, y) < noise_acc - 0.05, (spec.name, _acc(model, x_adv, y), noise_acc)


def test_autoattack_on_cpu_is_never_weaker_than_pgd(batch) -> None:
    model = trained_digits_model()
    x, y = batch[0][:20], batch[1][:20]
    cfg = SuiteConfig(eps=0.1, autoattack="standard")
    flags: list[str] = []
    aa = run_attack(AttackSpec("aa", "autoattack", "final", 0, 0.1), 0, model, x, y, cfg=cfg, batch_idx=0,
                    flags=flags)
    pgd = run_attack(AttackSpec("pgd", "pgd", "final", 40, 0.1), 1, model, x, y, cfg=cfg, batch_idx=0)
    assert (aa - x).abs().max() <= 0.1 + 1e-6
    assert _acc(model, aa, y) <= _acc(model, pgd, y)
    assert _acc(model, aa, y) < _acc(model, x, y)


def _report(model, x, y, cfg, source=None):
    return build_report(evaluate_model(model, x, y, cfg, source=source, progress=False), cfg, ra=model.ra,
                        n_classes=10, has_source=source is not None)


QUICK = dict(n_examples=None, autoattack=None, square_queries=300, batch_size=200)


@pytest.mark.slow
@pytest.mark.ci
def test_ra_attacked_only_through_final_output_is_flagged(tmp_path: Path) -> None:
    """A TRADES-ANCRA model trained by the Trainer: the adaptive attacks beat PGD on P' (the gate
    masks it). The same check on a quicker RA model runs by default (test_masking.py)."""
    from ancra_tune.config import TrainConfig
    from ancra_tune.trainer import Trainer

    cfg = TrainConfig.from_dict({"data.dataset": "digits", "data.batch_size": 64, "data.val_size": 0.15,
                                 "model.name": "small_cnn", "attack.eps": 0.3, "attack.step_size": 0.05,
                                 "eval.pgd_steps": 0, "optim.epochs": 5, "optim.lr": 0.05, "progress": False,
                                 "out_dir": str(tmp_path)})
    trainer = Trainer(cfg)
    trainer.fit()
    x, y = trainer.splits.val.images[:128].float() / 255, trainer.splits.val.labels[:128]
    suite = SuiteConfig.preset_config("quick", eps=0.3, **QUICK)
    report = _report(trainer.model.eval(), x, y, suite)
    check = next(c for c in report.checks if c.name == "final_output_not_masked")
    assert check.passed is False and check.scope == "final", check
    assert "pgd10_final" in report.masked_metrics
    assert report.flags("acc_pgd10_final") and report.credible("acc_pgd10_final") == report.robust_acc_worst
    # The gate masks PGD on P': an adaptive attack leaves fewer examples correct than PGD on P' does.
    pgd_final = next(a.accuracy for a in report.attacks if a.name == "pgd10_final")
    adaptive = min(a.accuracy for a in report.attacks if a.target in SURROGATES)
    assert report.robust_acc_worst <= adaptive < pgd_final


def _fake(batch_idx, clean, **correct):
    t = lambda v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    return BatchResult(batch_idx=batch_idx, clean=t(clean), correct={k: t(v) for k, v in correct.items()},
                       zero_grad=torch.zeros(len(clean), dtype=torch.bool))


def test_worst_case_is_per_example() -> None:
    cfg = SuiteConfig(eps=0.1, pgd_steps=1, cw_steps=1, mim_steps=1, square_queries=0, autoattack=None,
                      sweep_eps=(0.1,), features=False)
    names = [s.name for s in plan_attacks(cfg, ra=False, has_source=False)]
    # Every attack leaves 3 of 4 examples correct, but each misses a different one.
    results = []
    for b in range(2):
        correct = {}
        for i, n in enumerate(names):
            v = [True] * 4
            v[i % 4] = False
            correct[n] = v
        results.append(_fake(b, [True, True, True, True], **correct))
    report = build_report(results, cfg, ra=False, n_classes=10, has_source=False)
    main = [a for a in report.attacks if a.in_worst_case]
    assert all(a.accuracy == 0.75 for a in main)
    assert report.robust_acc_worst == 0.0  # 4 distinct failing examples in 4 attacks
    assert report.per_example["worst"] == [False] * 8
    # The report survives its JSON form unchanged (what workers, MLflow and `best` exchange).
    from ancra_tune.robustness import EvalReport

    again = EvalReport.from_dict(report.to_dict())
    assert again == report and again.metrics() == report.metrics() and again.tags() == report.tags()


def test_feature_statistics_by_hand() -> None:
    nat = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    adv = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    pairs = feature_pairs(nat, adv, labels, seed=0)
    torch.testing.assert_close(pairs["pp_cos"], torch.tensor([2 ** -0.5, 1.0, 0.6]))
    torch.testing.assert_close(pairs["pp_l2"], torch.tensor([1.0, 0.0, 4.0]))
    # Example 0 (label 0) has partners 1 or 2; examples 1 and 2 (label 1) can only pair with 0.
    torch.testing.assert_close(pairs["np_cos"][1:], torch.tensor([0.0, 0.6]))
    torch.testing.assert_close(pairs["np_l2"][1:], torch.tensor([5 ** 0.5, (4 + 16) ** 0.5]))


def test_batches_run_separately_merge_to_the_same_report(batch) -> None:
    model = trained_digits_model(ra=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch
    cfg = SuiteConfig(eps=0.1, pgd_steps=3, cw_steps=3, mim_steps=3, adaptive_steps=3, sweep_steps=3, apgd_iters=3,
                      apgd_targets=2, square_queries=30, autoattack=None, batch_size=64, features=True)
    whole = build_report(evaluate_model(model, x, y, cfg, progress=False), cfg, ra=True, n_classes=10,
                         has_source=False)
    parts = evaluate_model(model, x, y, cfg, progress=False, batches=[1]) + \
        evaluate_model(model, x, y, cfg, progress=False, batches=[0])
    merged = build_report(parts, cfg, ra=True, n_classes=10, has_source=False)
    # Evaluation changes nothing in the model (BatchNorm statistics included).
    assert not model.training
    for k, v in trained_digits_model(ra=True).state_dict().items():
        assert torch.equal(v, before[k]), k
    assert merged.per_example == whole.per_example
    assert merged.features == whole.features


def test_cli_eval_writes_report_and_pngs(tmp_path: Path, capsys) -> None:
    from trainables.cli import main

    ckpt = tmp_path / "std"
    assert main(["train", "quickstart", "--set", "optim.epochs=1", "--set", "model.ra=false", "--set",
                 "method.anc=false", "--set", "data.train_limit=256", "--out", str(ckpt), "--quiet"]) == 0
    out = tmp_path / "eval"
    rc = main(["eval", str(ckpt / "checkpoint.pt"), "--quick", "--n", "64", "--no-autoattack", "--deploy-ra",
               "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["deployment"] and not report["standard"]["ra"] and report["deployment_ra"]["ra"]
    assert report["standard"]["n_examples"] == 64 and report["standard"]["split"] == "val"
    assert any(a["target"] == "softgate" for a in report["deployment_ra"]["attacks"])
    for variant in ("standard", "deployment_ra"):
        assert (out / variant / "features_hist.png").stat().st_size > 1000
        assert (out / variant / "embedding.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "deployment_ra" in text and "gradient-masking checks" in text
    # The RA model's quickstart checkpoint cannot be "deployed": it already has RA.
    ra_ckpt = tmp_path / "ra"
    assert main(["train", "quickstart", "--set", "optim.epochs=1", "--set", "data.train_limit=64", "--set",
                 "eval.max_examples=32", "--out", str(ra_ckpt), "--quiet"]) == 0
    assert main(["eval", str(ra_ckpt / "checkpoint.pt"), "--deploy-ra", "--quiet"]) == 2
    assert "trained with RA" in capsys.readouterr().err


def test_cli_eval_stopped_goes_on_from_its_next_batch(tmp_path: Path, capsys, monkeypatch) -> None:
    """`ancra-tune eval` keeps each finished batch beside its report: stopped (Ctrl+C) in its third of
    four batches it exits 130 saying where they are, and the same command evaluates only the other two
    and writes the report an unstopped evaluation writes; the kept batches go with the report."""
    import ancra_tune.robustness.kept as kept_mod
    from trainables.cli import main

    ckpt = tmp_path / "ra"
    assert main(["train", "quickstart", "--set", "optim.epochs=1", "--set", "data.train_limit=64", "--set",
                 "eval.max_examples=32", "--out", str(ckpt), "--quiet"]) == 0
    cmd = ["eval", str(ckpt / "checkpoint.pt"), "--quick", "--n", "64", "--batch-size", "16", "--no-autoattack",
           "--quiet"]
    assert main([*cmd, "--out", str(tmp_path / "straight")]) == 0
    calls: list[list[int]] = []
    evaluate = kept_mod.evaluate_model

    def counted(*args, **kwargs):
        calls.append(list(kwargs["batches"]))
        if len(calls) == 3 and stop:
            raise KeyboardInterrupt  # Ctrl+C while its third batch runs
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(kept_mod, "evaluate_model", counted)
    out, stop = tmp_path / "stopped", True
    capsys.readouterr()
    assert main([*cmd, "--out", str(out)]) == 130
    assert f"its finished batches are kept in {out / 'eval_batches'}" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "eval_batches").iterdir()) == ["batch_00000.pt", "batch_00001.pt",
                                                                        "meta.json"]
    calls[:], stop = [], False
    assert main([*cmd, "--out", str(out)]) == 0
    assert calls == [[2], [3]]
    assert f"going on from the evaluation kept in {out / 'eval_batches'}: 2 of 4 batches done (32 of 64 examples" \
        in capsys.readouterr().out
    a, b = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "straight", out))
    for k in ("n_examples", "clean_acc", "robust_acc_worst", "attacks", "checks", "per_example"):
        assert a[k] == b[k], k
    assert not (out / "eval_batches").exists()


def test_batches_that_come_back_out_of_order_are_kept_and_a_stop_goes_on_from_them(tmp_path: Path, batch) -> None:
    """A runner that hands the batches back in another order (Ray workers: whichever finishes first)
    has each kept as it comes back; stopped after two, it is closed (its work in flight called off),
    asked next time for the other two alone, and the outcomes are those of one straight run."""
    from ancra_tune.robustness.kept import KeptBatches, LocalBatchFiles, batches_here, evaluate_kept

    x, y = batch[0][:64], batch[1][:64]
    model = trained_digits_model()
    cfg = SuiteConfig.preset_config("quick", eps=EPS, batch_size=16, autoattack=None)
    meta = {"model": "m", "suite": cfg.to_dict()}
    straight, *_ = evaluate_kept(model, x, y, cfg, kept=None, meta=meta)
    asked: list[list[int]] = []
    closed: list[bool] = []

    def backwards(model, x, y, suite, source, batches):
        asked.append(list(batches))
        try:
            yield from batches_here(model, x, y, suite, source, list(reversed(batches)))
        finally:
            closed.append(True)

    def stop_after_two(done: int, *_: object) -> None:
        if done == 2:
            raise KeyboardInterrupt

    kept = KeptBatches(LocalBatchFiles(tmp_path / "kept"))
    with pytest.raises(KeyboardInterrupt):
        evaluate_kept(model, x, y, cfg, kept=kept, meta=meta, run=backwards, on_batch=stop_after_two)
    assert asked == [[0, 1, 2, 3]] and closed == [True]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["batch_00002.pt", "batch_00003.pt", "meta.json"]
    results, seconds, resumed, untimed = evaluate_kept(model, x, y, cfg, kept=kept, meta=meta, run=backwards)
    assert asked[1:] == [[0, 1]] and (resumed, untimed) == (2, 0) and seconds > 0
    a, b = (build_report(r, cfg, ra=False, n_classes=10, has_source=False, meta={}).to_dict()
            for r in (straight, results))
    assert a["n_examples"] == 64 and a == b  # every attack's per-example outcome


def test_pca_embedding_projects_on_the_leading_components() -> None:
    """The quick preset's embedding: the two directions of largest variance (two clusters apart
    along one feature land on either side of the first axis); other methods are refused."""
    import numpy as np

    from ancra_tune.config import ConfigError
    from ancra_tune.robustness import SuiteConfig
    from ancra_tune.robustness.plots import _embed

    rng = np.random.default_rng(0)
    data = rng.normal(0, 0.1, (100, 8)).astype(np.float32)
    data[:50, 3] += 5
    data[50:, 3] -= 5
    emb, method = _embed(data, SuiteConfig(embedding="pca"), 50)
    assert method == "PCA" and emb.shape == (100, 2)
    first = emb[:, 0]
    side = np.sign(first[0])
    assert (np.sign(first[:50]) == side).all() and (np.sign(first[50:]) == -side).all()
    assert abs(first[:50].mean() - first[50:].mean()) == pytest.approx(10, rel=0.05)
    assert SuiteConfig.preset_config("quick").embedding == "pca" and SuiteConfig().embedding == "tsne"
    with pytest.raises(ConfigError, match="embedding"):
        SuiteConfig(embedding="umap-ish")


def test_every_planned_attack_kind_is_in_the_registry() -> None:
    """The attacks run from one registry (kind -> function): every kind a suite can plan is in it,
    and an unknown kind is refused naming the known ones."""
    from ancra_tune.robustness.runner import ATTACKS

    kinds = set()
    for preset in ("quick", "full"):
        cfg = SuiteConfig.preset_config(preset, eps=0.1)
        for ra in (False, True):
            for has_source in (False, True):
                kinds |= {s.kind for s in plan_attacks(cfg, ra=ra, has_source=has_source)}
    assert kinds <= set(ATTACKS), kinds - set(ATTACKS)
    assert set(AttackKind) == set(ATTACKS)  # every kind has its function, and nothing else is registered
    with pytest.raises(ValueError, match="unknown attack kind 'pgdd'; known: fgsm, pgd"):
        run_attack(AttackSpec(name="x", kind="pgdd", target="final", steps=1, eps=0.1), 0, None, None, None,
                   cfg=SuiteConfig.preset_config("quick", eps=0.1), batch_idx=0)


@pytest.mark.parametrize("ra", [False, True])
def test_the_cascade_gives_each_example_the_attack_it_would_get_in_the_whole_batch(batch, ra) -> None:
    """With PGD-type attacks and APGD through RA's surrogates (deterministic per example: each starts
    where it would in the whole batch, BatchNorm in eval mode), the cascade's worst case equals
    every-attack-on-every-example's example for example, the per-attack accuracies on the check
    examples are the same, and the attacks after the first ran on fewer examples: the check examples
    and the ones still standing."""
    import dataclasses

    model = trained_digits_model(ra=ra)
    x, y = batch
    cfg = SuiteConfig(eps=EPS, pgd_steps=5, cw_steps=5, mim_steps=5, sweep_steps=3, square_queries=0, autoattack=None,
                      batch_size=50, features=False, check_examples=30, adaptive_steps=3, apgd_iters=4,
                      apgd_targets=2)
    cascade = _report(model, x, y, cfg)
    everything = _report(model, x, y, dataclasses.replace(cfg, check_examples=None))
    assert cascade.per_example["worst"] == everything.per_example["worst"]
    assert cascade.robust_acc_worst == everything.robust_acc_worst
    assert cascade.n_check == 30 and everything.n_check == 128
    for a in cascade.attacks:
        assert a.n == 30 and cascade.per_example[a.name] == everything.per_example[a.name][:30], a.name
    first = cascade.attacks[0]  # FGSM runs first: on the check examples and every example classified right
    assert first.name == "fgsm_final" and first.attacked == 30 + sum(everything.per_example["clean"][30:])
    survivors = sum(everything.per_example["clean"])
    for a in cascade.attacks[1:]:
        assert a.attacked < 128 and (not a.in_worst_case or a.attacked <= 30 + survivors), (a.name, a.attacked)
    assert sum(a.attacked for a in cascade.attacks) < 0.8 * sum(a.attacked for a in everything.attacks)
    # PGD-2k continues PGD-k: it is at least as strong on every example PGD-k broke and kept broken
    assert cascade.attack("pgd10_final").accuracy <= cascade.attack("pgd5_final").accuracy + 0.05


def test_attacks_through_the_surrogates_score_each_visited_point_from_their_own_pass(batch) -> None:
    """PGD and APGD through a surrogate of RA's gate score every point they visit on the real model
    from the surrogate's own forward pass: one pass per step, not two, and the same AEs as scoring
    each point with a separate pass of the real model."""
    from ancra_tune.attacks import pgd
    from ancra_tune.robustness import adaptive

    class SeparatePass(adaptive.SurrogateModel):  # scoring as it was: a second pass per point
        def forward(self, x, gate_labels=None):
            self.tracker.observe(x, self.rows)
            return adaptive.surrogate_output(self.model, x, self.target, self.labels, self.temperature)

    model = trained_digits_model(ra=True)
    x, y = batch[0][:40], batch[1][:40]
    cfg = SuiteConfig(eps=EPS, adaptive_steps=4, apgd_iters=4, apgd_targets=2)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        for i, target in enumerate(SURROGATES):
            calls.clear()
            shared = run_attack(AttackSpec(f"pgd_{target}", "pgd", target, 4, EPS), i, model, x, y, cfg=cfg,
                                batch_idx=0)
            assert len(calls) == 4 + 1, (target, calls)  # the steps, and the last iterate scored
            calls.clear()
            gen = torch.Generator().manual_seed(0)
            tracker = adaptive.Tracker(model, x, y)
            surrogate = SeparatePass(model, target, y, tracker, cfg.gate_temperature)
            last = pgd(surrogate, x, y, eps=EPS, step_size=cfg.step, steps=4, bn="eval", generator=gen,
                       loss_fn=adaptive.pgd_loss(target))
            assert len(calls) == 2 * 4
            tracker.observe(last, surrogate.rows)
            gen = torch.Generator().manual_seed(0)
            tracker2 = adaptive.Tracker(model, x, y)
            own = adaptive.SurrogateModel(model, target, y, tracker2, cfg.gate_temperature)
            last2 = pgd(own, x, y, eps=EPS, step_size=cfg.step, steps=4, bn="eval", generator=gen,
                        loss_fn=adaptive.pgd_loss(target))
            tracker2.observe(last2, own.rows)
            assert torch.equal(tracker.result(last), tracker2.result(last2)), target
            assert torch.equal(tracker.fooled, tracker2.fooled), target
            assert shared.shape == x.shape
        calls.clear()
        adaptive.apgd(model, x, y, target="softgate", loss="ce", eps=EPS, n_iter=4, n_restarts=1, n_targets=2,
                      temperature=1.0, seed=0)
        assert len(calls) == 1 + 1 + 4  # the clean pass, APGD's start and its iterations: none scored twice
    finally:
        handle.remove()


def test_a_batch_moved_to_another_device_takes_every_tensor_with_it(batch) -> None:
    """A worker's batch computed on its GPU goes back to a driver that may have none
    (``BatchResult.to``): every tensor moves (the masking probe's and the features' too), nothing
    else changes."""
    from dataclasses import fields

    x, y = batch[0][:32], batch[1][:32]
    cfg = SuiteConfig(eps=0.1, pgd_steps=3, cw_steps=3, mim_steps=3, adaptive_steps=3, sweep_steps=3, apgd_iters=3,
                      apgd_targets=2, square_queries=30, autoattack=None, batch_size=32, features=True,
                      check_examples=16)
    (r,) = evaluate_model(trained_digits_model(ra=True), x, y, cfg, progress=False)

    def tensors(v: object) -> list[torch.Tensor]:
        if isinstance(v, torch.Tensor):
            return [v]
        if isinstance(v, dict):
            return [t for w in v.values() for t in tensors(w)]
        if hasattr(v, "__dataclass_fields__"):
            return [t for f in fields(v) for t in tensors(getattr(v, f.name))]
        return []

    every = tensors(r)
    assert r.probe is not None and r.feat_adv is not None and r.check is not None and len(every) >= 12
    moved = r.to("meta")
    assert len(tensors(moved)) == len(every) and all(t.device.type == "meta" for t in tensors(moved))
    assert [tuple(t.shape) for t in tensors(moved)] == [tuple(t.shape) for t in every]
    back = r.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(tensors(back), every, strict=True))
    assert (back.batch_idx, back.attacked, back.flags, back.suspicious) == (r.batch_idx, r.attacked, r.flags,
                                                                           r.suspicious)
