from pathlib import Path

import pytest

from ancra_tune.config import ConfigError, MethodConfig, TrainConfig, flatten, load_yaml_with_overrides


def test_defaults_are_the_papers() -> None:
    c = TrainConfig()
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.epochs) == (0.01, 0.9, 2e-4, 120)
    assert c.optim.milestone_epochs() == [75, 90, 100]
    assert c.data.batch_size == 128
    assert c.attack.eps == pytest.approx(8 / 255) and c.attack.step_size == 0.007 and c.attack.steps == 10
    assert (c.method.alpha, c.method.zeta, c.method.gamma) == (1.0, 3.0, 2.0)
    assert c.method.base_loss == "trades" and c.method.effective_beta == 6.0
    assert MethodConfig(base_loss="mart").effective_beta == 5.0
    assert MethodConfig(base_loss="pgd_at").effective_beta is None
    assert c.method.negatives == "random" and c.method.targeted  # the paper's "Targeted"
    # The released script's choices (train_CIFAR10_ResNet.py), each a named option.
    assert c.method.random_draw == "class" and c.method.criterion_pick == "max_logit"
    assert c.method.joint_forward is False  # x, x^a, x^o: three train-mode forwards
    assert (c.attack.bn_mode, c.attack.ra_gate) == ("eval", "predicted")  # forward(_eval=True) calls eval()
    assert (c.attack.objective, c.attack.aux_weight, c.attack.schedule) == ("final_and_aux", None, "sequential")
    assert (c.attack.init, c.attack.init_std) == ("gaussian", 0.001)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"method.alpha": 1.5}, ["method.alpha", "[0, 1]"]),
        ({"method.alpha": -0.1}, ["method.alpha"]),
        ({"attack.eps": 0.0}, ["attack.eps", "> 0"]),
        ({"attack.eps": -1}, ["attack.eps"]),
        ({"method.negatives": "nearest"}, ["method.negatives", "random", "soft", "hard", "easy"]),
        ({"attack.schedule": "joint"}, ["attack.schedule", "sequential", "batched"]),
        ({"attack.objective": "sum"}, ["attack.objective", "final_and_aux", "final"]),
        ({"eval.split": "train"}, ["eval.split", "val", "test"]),
        ({"model.name": "vit"}, ["model.name", "resnet18", "small_cnn", "wrn34_10"]),
        ({"data.dataset": "imagenet"}, ["data.dataset", "cifar10", "npz", "digits"]),
        ({"method.base_loss": "awp"}, ["method.base_loss", "pgd_at", "trades", "mart"]),
        ({"method.alhpa": 0.5}, ["method", "alhpa", "alpha"]),
        ({"optimizer.lr": 0.1}, ["optimizer", "optim"]),
        ({"optim.epochs": 2.5}, ["optim.epochs", "integer"]),
        ({"model.ra": "yes"}, ["model.ra", "true or false"]),
        ({"data.dataset": "npz"}, ["data.train_file"]),
    ],
)
def test_bad_values_name_the_field_and_allowed(override: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_configs_are_frozen() -> None:
    c = TrainConfig()
    with pytest.raises(AttributeError):
        c.method.alpha = 0.5  # type: ignore[misc]


def test_dotted_and_nested_keys_and_fractions() -> None:
    c = TrainConfig.from_dict({"method": {"zeta": 2}, "method.alpha": 0.25, "attack.eps": "16/255"})
    assert c.method.zeta == 2.0 and isinstance(c.method.zeta, float)
    assert c.method.alpha == 0.25
    assert c.attack.eps == pytest.approx(16 / 255)
    assert c.replace(**{"method.gamma": 0.5}).method.gamma == 0.5
    assert c.method.gamma == 2.0  # the original is untouched


def test_yaml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: small_cnn\nmethod:\n  alpha: 0.5\n  zeta: 1.0\n")
    d = load_yaml_with_overrides(f, ["method.alpha=0.75", "model.ra=false", "optim.milestones=[0.5]"])
    c = TrainConfig.from_dict(d)
    assert (c.model.name, c.model.ra, c.method.alpha, c.method.zeta) == ("small_cnn", False, 0.75, 1.0)
    assert c.optim.milestones == (0.5,)
    with pytest.raises(ConfigError, match="key=value"):
        load_yaml_with_overrides(None, ["method.alpha"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_with_overrides(tmp_path / "missing.yaml")


def test_flatten_is_scalar_and_round_trips() -> None:
    c = TrainConfig.from_dict({"method.alpha": 0.3, "model.name": "small_cnn"})
    flat = flatten(c)
    assert flat["method.alpha"] == 0.3 and flat["model.name"] == "small_cnn"
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert TrainConfig.from_dict(flat) == c
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_milestones_scale_with_epochs() -> None:
    # Epochs counted from 1, as the released script counts them; the first always at the base lr.
    assert TrainConfig.from_dict({"optim.epochs": 12}).optim.milestone_epochs() == [8, 9, 10]
    assert TrainConfig.from_dict({"optim.epochs": 1}).optim.milestone_epochs() == [2]


def test_beta_follows_the_base_loss_unless_set(tmp_path: Path) -> None:
    """MART trains with its own beta = 5 in every path a setting can take, unless beta was set."""
    from trainables.study import load_study

    def beta(cfg: TrainConfig) -> float | None:
        return cfg.method.effective_beta

    trades = TrainConfig()
    assert beta(trades) == 6.0
    assert beta(trades.replace(**{"method.base_loss": "mart"})) == 5.0  # replace keeps beta unset
    assert beta(TrainConfig.from_dict(flatten(trades)).replace(**{"method.base_loss": "mart"})) == 5.0
    assert beta(TrainConfig.from_dict(load_yaml_with_overrides(None, ["method.base_loss=mart"]))) == 5.0  # --set
    from ancra_tune.config import resolve_config_path

    preset = load_yaml_with_overrides(resolve_config_path("paper_cifar10_resnet18"), ["method.base_loss=mart"])
    assert beta(TrainConfig.from_dict(preset)) == 5.0
    # A user's explicit beta wins everywhere.
    assert beta(trades.replace(**{"method.beta": 2.0, "method.base_loss": "mart"})) == 2.0
    assert flatten(trades)["method.beta"] is None and flatten(trades, resolved=True)["method.beta"] == 6.0

    f = tmp_path / "s.yaml"
    f.write_text("kind: ablation\nbase: quickstart\ntrain: {method.base_loss: mart}\n"
                 "ablation: {grid: {method.base_loss: [trades, mart], method.anc: [true]}}\n")
    study = load_study(f)
    assert beta(study.train) == 5.0  # the study's train overrides
    by_loss = {p["method.base_loss"]: beta(study.train_config(p, seed=0)) for p in study.grid_points()}
    assert by_loss == {"trades": 6.0, "mart": 5.0}  # grid points
    f.write_text("base: quickstart\nsearch: {space: {method.base_loss: [trades, mart]}}\n")
    sweep = load_study(f)
    assert beta(sweep.train_config({"method.base_loss": "mart"}, seed=0)) == 5.0  # sampled parameters
    f.write_text("base: quickstart\ntrain: {method.beta: 3.0}\nsearch: {space: {method.base_loss: [trades, mart]}}\n")
    assert beta(load_study(f).train_config({"method.base_loss": "mart"}, seed=0)) == 3.0


def test_inactive_settings_are_named() -> None:
    from ancra_tune.config import inactive_keys

    off = inactive_keys(TrainConfig.from_dict({"method.anc": False, "model.ra": False, "method.base_loss": "pgd_at"}))
    assert {"method.alpha", "method.zeta", "method.gamma", "method.beta"} <= set(off)
    assert off["method.alpha"] == "ANC is off" and off["method.gamma"] == "RA is off"
    assert "method.alpha" not in inactive_keys(TrainConfig())
