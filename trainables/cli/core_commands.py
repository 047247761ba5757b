"""`ancra-tune train` and `ancra-tune eval`: one configuration trained in this process, and the
robustness report of a checkpoint (sharded over Ray workers with ``--workers``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ancra_tune.config import (
    TrainConfig,
    load_yaml_with_overrides,
    resolve_config_path,
)

from .codes import EXIT_DONE, EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    from ancra_tune.trainer import DivergedError, Trainer  # torch loads only for commands that need it

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
    if args.resume and not (Path(cfg.out_dir) / "checkpoint.pt").is_file():
        print(f"error: nothing to resume in {cfg.out_dir} (no checkpoint.pt there); run without --resume to "
              "start from scratch, or pass the --out of the run to continue", file=sys.stderr)
        return 2
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
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) or k == "loss"}
    ckpt = trainer.out_dir / "checkpoint.pt"
    print(f"done: {shown}\ncheckpoint: {ckpt}")
    if cfg.eval.final_suite != "none":  # e.g. the paper preset: the full suite on the test split
        from ancra_tune.robustness import SuiteConfig, evaluate_checkpoint, format_report

        suite = SuiteConfig.preset_config(cfg.eval.final_suite, eps=cfg.attack.eps)
        out = trainer.out_dir / f"eval_{cfg.eval.split}"
        print(f"evaluating on the {cfg.eval.split} split ({cfg.eval.final_suite} suite)...", flush=True)
        report = evaluate_checkpoint(ckpt, suite, split=cfg.eval.split, out_dir=out, device=str(trainer.device),
                                     progress=cfg.progress)
        print(format_report(report))
        print(f"report: {out / 'report.json'}")
    return 0

def _eval(args: argparse.Namespace) -> int:
    import json

    from ancra_tune.robustness import SuiteConfig, evaluate_checkpoint, evaluate_deployment, format_report

    if args.checkpoint.startswith("models:/"):  # a registered model: evaluate its training checkpoint
        from ..tracking import TrackingError, download_checkpoint, resolve_tracking_uri

        try:
            uri = resolve_tracking_uri(args.tracking_uri)
            path, label = download_checkpoint(uri, args.checkpoint, Path(args.out or "eval_registered") / "model")
        except TrackingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"evaluating {label} ({args.checkpoint}) from its checkpoint {path}", flush=True)
        args.checkpoint = str(path)
        args.out = args.out or "eval_registered"
    overrides = {k: v for k, v in (("n_examples", args.n), ("eps", args.eps), ("batch_size", args.batch_size),
                                   ("seed", args.seed)) if v is not None}
    if args.no_autoattack:
        overrides["autoattack"] = None
    if args.check_examples is not None:
        overrides["check_examples"] = None if args.check_examples == "all" else int(args.check_examples)
    if args.eps is None:  # default: the budget the model was trained for
        from ancra_tune.checkpoint import load_checkpoint

        overrides["eps"] = float(load_checkpoint(args.checkpoint)["config"]["attack"]["eps"])
    cfg = SuiteConfig.preset_config("quick" if args.quick else "full", **overrides)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    text = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    keep = out / "eval_batches"  # a stopped evaluation goes on from its next batch (with --workers too)

    def taken_up(done: int, n: int, examples: int, n_examples: int, seconds: float, resumed: int, timed: int) -> None:
        if resumed and done == resumed:
            print(f"going on from the evaluation kept in {keep}: {done} of {n} batches done ({examples:,} of "
                  f"{n_examples:,} examples, {seconds / 60:.0f} min)", file=text, flush=True)

    kwargs = dict(split=args.split, source=args.source, out_dir=out, device=device, data_root=args.data_root,
                  progress=not args.quiet, keep=keep, on_batch=taken_up)
    if args.workers:  # shard the batches over Ray workers (a local Ray, or --address)
        from ..distributed_eval import ray_evaluator

        kwargs["run"] = ray_evaluator(args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
                                      gpus_per_worker=1.0 if device == "cuda" else 0.0, progress=not args.quiet)
        kwargs["device"] = "cpu"  # the workers move the model to their own device
    try:
        if args.deploy_ra:
            reports = evaluate_deployment(args.checkpoint, cfg, **kwargs)
        else:
            report = evaluate_checkpoint(args.checkpoint, cfg, **kwargs)
    except KeyboardInterrupt:
        print(f"\nstopped; its finished batches are kept in {keep}: the same command goes on from there",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if args.deploy_ra:
        for name, r in reports.items():
            print(f"== {name} ==\n{format_report(r)}\n", file=text)
        shown = {k: r.to_dict(per_example=False) for k, r in reports.items()}
    else:
        print(format_report(report), file=text)
        shown = report.to_dict(per_example=False)
        print(f"robustness card: {out / 'robustness_card.png'}", file=text)
    print(f"report: {out / 'report.json'}", file=text, flush=True)
    if args.json:
        print(json.dumps(shown, indent=1))
    return EXIT_DONE

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
