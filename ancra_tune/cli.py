"""The ``ancra-tune`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .config import ConfigError, TrainConfig, load_yaml_with_overrides
from .data import DatasetUnavailableError

PRESETS = ("quickstart", "paper_cifar10_resnet18", "mnist_small_cnn")


def resolve_config_path(name: str | None) -> Path | None:
    """A YAML path, or the name of a preset shipped with the package."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    if name in PRESETS:
        return Path(str(resources.files("ancra_tune") / "presets" / f"{name}.yaml"))
    raise ConfigError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(PRESETS)}")


def _train(args: argparse.Namespace) -> int:
    from .trainer import DivergedError, Trainer  # torch loads only for commands that need it

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("progress=false")
    cfg = TrainConfig.from_dict(load_yaml_with_overrides(resolve_config_path(args.config), overrides))
    trainer = Trainer(cfg)
    print(f"ancra-tune train: {cfg.method.base_loss}{'-ANC' if cfg.method.anc else ''}"
          f"{'-RA' if cfg.model.ra else ''} on {cfg.data.dataset} with {cfg.model.name}, "
          f"{cfg.optim.epochs} epochs, device {trainer.device}; writing to {trainer.out_dir}", flush=True)
    try:
        metrics = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished epoch is in {trainer.out_dir}/checkpoint.pt: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    except DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") or k == "loss"}
    print(f"done: {shown}\ncheckpoint: {trainer.out_dir / 'checkpoint.pt'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ancra-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one configuration in this process")
    t.add_argument("config", nargs="?", default=None,
                   help=f"YAML file or preset ({', '.join(PRESETS)}); default: the paper's settings")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.alpha=0.5 (repeatable)")
    t.add_argument("--data-root", help="folder with (or for) downloaded datasets")
    t.add_argument("--out", help="output folder (config.yaml, metrics.jsonl, checkpoint.pt)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"))
    t.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, DatasetUnavailableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
