"""Typed, frozen, validated configuration.

Every section is a frozen dataclass checked at construction: a bad value raises
:class:`ConfigError` naming the field and what is allowed. Dicts exist only at the
boundary (YAML files, ``--set`` overrides, Ray Tune and MLflow): :meth:`TrainConfig.from_dict`
reads them, :func:`flatten` writes a dict of scalars keyed ``section.field``.

Defaults are the paper's settings (section IV-A): SGD lr 0.01, momentum 0.9,
weight decay 2e-4, batch 128, 120 epochs with lr / 10 at epochs 75, 90 and 100,
eps = 8/255, PGD-10 with step 0.007, alpha = 1, zeta = 3, gamma = 2, TRADES beta = 6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Re-exported: every layer imports the configuration's helpers from here.
from .config_fields import (  # noqa: F401
    ConfigError,
    build_dataclass,
    check_choice,
    check_field,
    merge_nested,
    nest_keys,
    to_builtin,
)
from .config_files import (  # noqa: F401
    PRESETS,
    load_yaml_with_overrides,
    merge_config,
    parse_override,
    read_yaml_mapping,
    resolve_config_path,
)

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "mnist", "npz", "digits")
MODELS = ("small_cnn", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10")
BASE_LOSSES = ("pgd_at", "trades", "mart")
NEGATIVE_STRATEGIES = ("random", "soft", "hard", "easy")
RANDOM_DRAWS = ("class", "example")
CRITERION_PICKS = ("max_logit", "uniform")
BN_MODES = ("eval", "train")
ATTACK_OBJECTIVES = ("final_and_aux", "final")
ATTACK_SCHEDULES = ("sequential", "batched")
ATTACK_INITS = ("gaussian", "uniform", "none")
TRADES_ATTACK_LOSSES = ("ce", "kl")
RA_GATES = ("predicted", "label")
NEGATIVE_GATES = ("own_label", "anchor_label")
AUX_REDUCTIONS = ("mean", "sum")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
EVAL_SPLITS = ("val", "test")
FINAL_SUITES = ("none", "quick", "full")

DEFAULT_BETA = {"trades": 6.0, "mart": 5.0}


_choice, _check = check_choice, check_field


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and batched. Images are always fed in [0, 1]."""

    dataset: str = "cifar10"
    root: str = "./data"  # torchvision download folder, or the Tiny-ImageNet folder's parent
    train_file: str | None = None  # npz dataset: training file (images uint8 NHWC, labels)
    test_file: str | None = None  # npz dataset: optional test file
    val_size: float = 0.1  # < 1: fraction of the training set held out; >= 1: number of examples
    split_seed: int = 0  # fixed, independent of the training seed: all trials share one split
    train_limit: int | None = None  # use only the first N training examples (after the split)
    augment: bool | None = None  # None: random crop + flip for CIFAR/Tiny-ImageNet, none otherwise
    normalize: bool = True  # per-channel mean/std inside the model (inputs stay in [0, 1])
    batch_size: int = 128
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        s = "data"
        _choice(s, "dataset", self.dataset, DATASETS)
        if self.dataset == "npz":
            _check(bool(self.train_file), s, "train_file", self.train_file, "set for dataset 'npz'")
        _check(self.val_size >= 0, s, "val_size", self.val_size, ">= 0")
        _check(self.batch_size >= 2, s, "batch_size", self.batch_size, ">= 2 (negatives need a batch)")
        _check(self.eval_batch_size >= 1, s, "eval_batch_size", self.eval_batch_size, ">= 1")
        if self.train_limit is not None:
            _check(self.train_limit >= 2, s, "train_limit", self.train_limit, ">= 2 or null")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and reverse attention (RA, eq. 6)."""

    name: str = "resnet18"
    ra: bool = True  # RA in every block of the last stage
    ra_feed_weighted: bool = True  # released code: each block's weighted output feeds the next block

    def __post_init__(self) -> None:
        _choice("model", "name", self.name, MODELS)


@dataclass(frozen=True)
class AttackConfig:
    """The L-inf PGD that crafts training AEs (untargeted) and OEs (targeted, eq. 5).

    Defaults are the released code's (``u_pgd``/``t_pgd`` in ``train_CIFAR10_ResNet.py``): the
    model's forward with ``_eval=True`` switches the whole network to eval mode, so BatchNorm
    uses its running statistics and RA gates by the prediction; the objective is
    CE(P') + gamma * mean_b CE(P_b) over the RA blocks; OEs are crafted first, then AEs.
    """

    eps: float = 8 / 255
    step_size: float = 0.007
    steps: int = 10
    init: str = "gaussian"  # released code: x + 0.001 * N(0, 1); "uniform": U(-eps, eps)
    init_std: float = 0.001
    bn_mode: str = "eval"  # released: eval-mode BatchNorm while attacking; "train": batch statistics
    ra_gate: str = "predicted"  # RA gate while attacking: argmax of the auxiliary prediction, or y
    objective: str = "final_and_aux"  # released: CE(P') + w * mean_b CE(P_b); "final": CE(P') only
    aux_weight: float | None = None  # w above; None: method.gamma (the released AE attack fixes 2.0)
    schedule: str = "sequential"  # released: the OE attack, then the AE attack; "batched": one 2B attack

    def __post_init__(self) -> None:
        s = "attack"
        _check(self.eps > 0, s, "eps", self.eps, "> 0")
        _check(self.step_size > 0, s, "step_size", self.step_size, "> 0")
        _check(self.steps >= 1, s, "steps", self.steps, ">= 1")
        _choice(s, "init", self.init, ATTACK_INITS)
        _check(self.init_std >= 0, s, "init_std", self.init_std, ">= 0")
        _choice(s, "bn_mode", self.bn_mode, BN_MODES)
        _choice(s, "ra_gate", self.ra_gate, RA_GATES)
        _choice(s, "objective", self.objective, ATTACK_OBJECTIVES)
        if self.aux_weight is not None:
            _check(self.aux_weight >= 0, s, "aux_weight", self.aux_weight, ">= 0 or null")
        _choice(s, "schedule", self.schedule, ATTACK_SCHEDULES)


@dataclass(frozen=True)
class MethodConfig:
    """Base AT loss, ANC (eq. 3-5) and the RA auxiliary loss (Algorithm 1)."""

    base_loss: str = "trades"
    # None: the base loss's own (6 for TRADES, 5 for MART; unused by PGD-AT). Kept None in the
    # config, so changing base_loss later (a grid point, --set, replace) changes beta with it.
    beta: float | None = None
    trades_attack_loss: str = "ce"  # paper footnote 2 maximises CE; "kl" is vanilla TRADES
    anc: bool = True
    alpha: float = 1.0
    zeta: float = 3.0
    negatives: str = "random"  # from the batch: random / soft (Soft-LS) / hard (Hard-LS) / easy
    random_draw: str = "class"  # released: another class uniformly, then one of its examples; "example"
    criterion_pick: str = "max_logit"  # soft/hard/easy, released: the candidate with the largest logit
    #                                    of the anchor's label; "uniform": any candidate
    targeted: bool = True  # then a targeted PGD toward the anchor's label (eq. 5); paper's "Targeted"
    negatives_warmup_epochs: int = 10  # released code: soft/hard start after 10 epochs of random
    gamma: float = 2.0  # weight of the auxiliary (RA block) losses; used only when model.ra
    anc_on_aux: bool = True  # released code: ANC also on every auxiliary output
    aux_reduction: str = "mean"  # over RA blocks: "mean" (released code) or "sum" (Algorithm 1 literally)
    negative_gate: str = "own_label"  # RA gate of x^o in the loss: its own label, or the anchor's
    joint_forward: bool = False  # released: x, x^a, x^o in three forwards (three BatchNorm batches)

    def __post_init__(self) -> None:
        s = "method"
        _choice(s, "base_loss", self.base_loss, BASE_LOSSES)
        if self.beta is not None:
            _check(self.beta >= 0, s, "beta", self.beta, ">= 0 or null (the base loss's default)")
        _choice(s, "trades_attack_loss", self.trades_attack_loss, TRADES_ATTACK_LOSSES)
        _check(0.0 <= self.alpha <= 1.0, s, "alpha", self.alpha, "in [0, 1]")
        _check(self.zeta >= 0, s, "zeta", self.zeta, ">= 0")
        _choice(s, "negatives", self.negatives, NEGATIVE_STRATEGIES)
        _choice(s, "random_draw", self.random_draw, RANDOM_DRAWS)
        _choice(s, "criterion_pick", self.criterion_pick, CRITERION_PICKS)
        _check(self.negatives_warmup_epochs >= 0, s, "negatives_warmup_epochs",
               self.negatives_warmup_epochs, ">= 0")
        _check(self.gamma >= 0, s, "gamma", self.gamma, ">= 0")
        _choice(s, "aux_reduction", self.aux_reduction, AUX_REDUCTIONS)
        _choice(s, "negative_gate", self.negative_gate, NEGATIVE_GATES)

    @property
    def effective_beta(self) -> float | None:
        """beta as trained: the one set, else the base loss's default (None for PGD-AT)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.base_loss)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with the paper's step schedule, scaled to the number of epochs."""

    epochs: int = 120
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple[float, ...] = (75 / 120, 90 / 120, 100 / 120)  # fractions of `epochs`
    lr_decay: float = 0.1

    def __post_init__(self) -> None:
        s = "optim"
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        _check(self.epochs >= 1, s, "epochs", self.epochs, ">= 1")
        _check(self.lr > 0, s, "lr", self.lr, "> 0")
        _check(0 <= self.momentum < 1, s, "momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, s, "weight_decay", self.weight_decay, ">= 0")
        _check(all(0 < m <= 1 for m in self.milestones), s, "milestones", self.milestones,
               "fractions in (0, 1]")
        _check(0 < self.lr_decay <= 1, s, "lr_decay", self.lr_decay, "in (0, 1]")

    def milestone_epochs(self) -> list[int]:
        """Epochs counted from 1 (as the released code counts them) from which lr is divided:
        75, 90, 100 for 120 epochs, i.e. 74/15/10/21 epochs at 1e-2/1e-3/1e-4/1e-5. The first
        epoch always runs at the base lr."""
        return sorted({max(2, round(m * self.epochs)) for m in self.milestones})


@dataclass(frozen=True)
class EvalConfig:
    """Per-epoch validation (clean accuracy and PGD accuracy, each naming what it attacked) and
    the evaluation ``ancra-tune train`` runs after the last epoch."""

    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    max_examples: int = 1000  # validation examples attacked each epoch (clean acc uses all)
    split: str = "val"  # per-epoch metrics on the held-out validation split (val_*), or test (test_*)
    final_suite: str = "none"  # `ancra-tune train` ends with this robustness suite on `split`

    def __post_init__(self) -> None:
        _check(self.pgd_steps >= 0, "eval", "pgd_steps", self.pgd_steps, ">= 0 (0 disables PGD)")
        _check(self.pgd_step_size > 0, "eval", "pgd_step_size", self.pgd_step_size, "> 0")
        _check(self.max_examples >= 1, "eval", "max_examples", self.max_examples, ">= 1")
        _choice("eval", "split", self.split, EVAL_SPLITS)
        _choice("eval", "final_suite", self.final_suite, FINAL_SUITES)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available
    precision: str = "fp32"  # bf16: autocast on CUDA (attacks and loss); ignored on CPU
    channels_last: bool = False  # memory format for convolutions on CUDA
    out_dir: str = "runs/train"
    progress: bool = True
    # A mid-epoch checkpoint at most this often (seconds, from the epoch's start or the last one): a
    # run killed mid-epoch resumes at the step it reached, exactly as if never stopped. 0: only at
    # epoch ends.
    checkpoint_every_s: float = 600.0

    def __post_init__(self) -> None:
        _choice("config", "device", self.device, DEVICES)
        _choice("config", "precision", self.precision, PRECISIONS)
        if not self.checkpoint_every_s >= 0:
            raise ValueError(f"config.checkpoint_every_s must be >= 0 seconds (0: only at epoch ends), "
                             f"got {self.checkpoint_every_s}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None) -> TrainConfig:
        """Build from a nested dict (YAML) and/or dotted keys ``{"method.alpha": 0.5}``."""
        return build_dataclass(cls, nest_keys(d or {}), "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        return cls.from_dict(load_yaml_with_overrides(path, overrides))

    def to_dict(self) -> dict[str, Any]:
        return to_builtin(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> TrainConfig:
        """A copy with dotted-key changes: ``cfg.replace(**{"method.alpha": 0.5})``."""
        return TrainConfig.from_dict(merge_nested(self.to_dict(), nest_keys(dotted)))


def params_text(params: Mapping[str, Any], *, inactive: Collection[str] = (), sep: str = ", ") -> str:
    """Searched settings as a person reads them: the last part of each key, floats to three
    digits, settings the configuration does not use as "inactive"; the seed left out."""
    def short(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return sep.join(f"{k.rsplit('.', 1)[-1]}={'inactive' if k in inactive else short(v)}"
                    for k, v in params.items() if k != "seed")


def flatten(cfg: TrainConfig, *, resolved: bool = False) -> dict[str, Any]:
    """``{"method.alpha": 1.0, ...}``: scalars only (tuples become lists' string form).

    ``resolved``: values as trained (``method.beta`` = the base loss's default where it is null),
    for display and MLflow; without it the dict round-trips through :meth:`TrainConfig.from_dict`."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(obj, list):
            out[prefix] = ",".join(str(x) for x in obj)
        else:
            out[prefix] = obj

    walk("", cfg.to_dict())
    if resolved:
        out["method.beta"] = cfg.method.effective_beta
    return out


def inactive_keys(cfg: TrainConfig) -> dict[str, str]:
    """Settings that change nothing in this configuration, each with the reason (e.g. alpha and
    zeta when ANC is off, gamma when RA is off): logged as inactive, never as if they were used."""
    out: dict[str, str] = {}
    m = cfg.method
    if not m.anc:
        for k in ("alpha", "zeta", "negatives", "random_draw", "criterion_pick", "targeted",
                  "negatives_warmup_epochs", "anc_on_aux", "negative_gate"):
            out[f"method.{k}"] = "ANC is off"
    elif m.negatives == "random":
        for k in ("criterion_pick", "negatives_warmup_epochs"):
            out[f"method.{k}"] = "random negatives"
    if not cfg.model.ra:
        for k in ("method.gamma", "method.aux_reduction", "method.anc_on_aux", "model.ra_feed_weighted",
                  "attack.ra_gate", "attack.objective", "attack.aux_weight"):
            out[k] = "RA is off"
    if m.base_loss == "pgd_at":
        out["method.beta"] = "PGD-AT has no beta"
    if m.base_loss != "trades":
        out["method.trades_attack_loss"] = f"base loss is {m.base_loss}"
    if cfg.attack.init != "gaussian":
        out["attack.init_std"] = f"attack.init is {cfg.attack.init}"
    return out


# --------------------------------------------------------------------------- internals


