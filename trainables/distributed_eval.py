"""Distributed evaluation: the robustness suite's batches sharded over Ray workers.

Every batch's attacks draw their randomness from (seed, batch index, attack), so a batch gives
the same per-example outcomes wherever it runs; the driver merges the shards' per-example
results with :func:`ancra_tune.robustness.build_report` into the report a single process
gives on the same examples (AutoAttack included: it runs per batch too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ancra_tune.robustness import BatchResult, SuiteConfig, batch_slices, evaluate_model


def shard_batches(n_batches: int, workers: int) -> list[list[int]]:
    """Round-robin shards of batch indices (balanced when batches cost the same); no empty shard."""
    shards = [list(range(k, n_batches, workers)) for k in range(min(workers, n_batches))]
    return [s for s in shards if s]


def _eval_shard(model: nn.Module, x: Tensor, y: Tensor, cfg: SuiteConfig, source: nn.Module | None,
                batches: list[int], device: str, threads: int) -> list[BatchResult]:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = model.to(dev).eval()
    src = source.to(dev).eval() if source is not None else None
    results = evaluate_model(model, x, y, cfg, source=src, progress=False, batches=batches)
    for r in results:  # back to CPU for the driver
        r.clean, r.zero_grad = r.clean.cpu(), r.zero_grad.cpu()
        r.correct = {k: v.cpu() for k, v in r.correct.items()}
    return results


class RayEvaluator:
    """An ``evaluate`` callable for :func:`ancra_tune.robustness.evaluate_checkpoint` that runs
    the batches on ``workers`` Ray tasks of ``cpus`` CPUs (and ``gpus`` GPUs) each."""

    def __init__(self, workers: int, *, cpus: float = 1.0, gpus: float = 0.0) -> None:
        if workers < 1:
            raise ValueError(f"--workers {workers} is invalid: must be >= 1")
        self.workers, self.cpus, self.gpus = workers, cpus, gpus
        self.shards: list[list[int]] = []

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, cfg: SuiteConfig, *, source: nn.Module | None = None,
                 progress: bool = True, batches: Sequence[int] | None = None) -> list[BatchResult]:
        import ray

        n_batches = len(batch_slices(x.shape[0], cfg.batch_size))
        todo = list(range(n_batches)) if batches is None else list(batches)
        self.shards = [[todo[i] for i in s] for s in shard_batches(len(todo), self.workers)]
        if len(self.shards) < self.workers:
            print(f"note: {len(todo)} batch(es) of {cfg.batch_size} for {self.workers} workers: only "
                  f"{len(self.shards)} can work; a smaller --batch-size gives more shards", flush=True)
        device = "cuda" if self.gpus > 0 else "cpu"
        task = ray.remote(_eval_shard).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=2)
        refs = [ray.put(v) for v in (model.cpu(), x, y, source.cpu() if source is not None else None)]
        threads = max(1, int(math.floor(self.cpus)))
        pending = [task.remote(*refs[:3], cfg, refs[3], shard, device, threads) for shard in self.shards]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc=f"shards on {self.workers} workers", dynamic_ncols=True)
        results: list[BatchResult] = []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results.extend(ray.get(done[0]))
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        return sorted(results, key=lambda r: r.batch_idx)


def cluster_check(cpus: float, gpus: float, nodes: list[dict[str, float]]) -> None:
    """Fail fast when not even one shard task fits any node."""
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
        raise RuntimeError(f"an evaluation worker needs {cpus:g} CPU and {gpus:g} GPU, but no node has that "
                           f"({have}); lower --cpus-per-worker or add nodes")


def ray_evaluator(workers: int, *, address: str | None = None, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0) -> RayEvaluator:
    """Join or start Ray, check that a shard fits, and return the ``evaluate`` callable that
    :func:`ancra_tune.robustness.evaluate_checkpoint` runs the attacks with."""
    from .ray_session import alive_nodes, init_ray

    init_ray(address)
    cluster_check(cpus_per_worker, gpus_per_worker, alive_nodes())
    return RayEvaluator(workers, cpus=cpus_per_worker, gpus=gpus_per_worker)
