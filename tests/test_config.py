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
    assert c.method.base_loss == "trades" and c.method.beta == 6.0
    assert MethodConfig(base_loss="mart").beta == 5.0
    assert c.method.negatives == "random" and c.method.targeted  # the paper's "Targeted"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"method.alpha": 1.5}, ["method.alpha", "[0, 1]"]),
        ({"method.alpha": -0.1}, ["method.alpha"]),
        ({"attack.eps": 0.0}, ["attack.eps", "> 0"]),
        ({"attack.eps": -1}, ["attack.eps"]),
        ({"method.negatives": "nearest"}, ["method.negatives", "random", "soft", "hard"]),
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
    assert TrainConfig.from_dict({"optim.epochs": 12}).optim.milestone_epochs() == [8, 9, 10]
