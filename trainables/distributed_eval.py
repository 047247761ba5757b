"""Distributed evaluation: the robustness suite's batches spread over Ray workers.

Every batch's attacks draw their randomness from (seed, batch index, attack), so a batch gives
the same per-example outcomes wherever it runs; the driver merges the batches' per-example
results with :func:`ancra_tune.robustness.build_report` into the report a single process
gives on the same examples (AutoAttack included: it runs per batch too). Each batch is one task,
at most ``workers`` at once, a free worker taking the next batch (batches do not cost the same:
the first holds the examples every attack and check runs on); the driver keeps each batch as it
comes back (``ancra-tune eval``'s ``eval_batches/``), so a stopped evaluation goes on from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ancra_tune.robustness import BatchResult, SuiteConfig
from ancra_tune.robustness.kept import batches_here


def _eval_batch(model: nn.Module, x: Tensor, y: Tensor, cfg: SuiteConfig, source: nn.Module | None,
                batch: int, device: str, threads: int) -> tuple[BatchResult, float]:
    """One batch on a worker: its result (on the CPU, for the driver) and the seconds it took there."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = model.to(dev).eval()
    src = source.to(dev).eval() if source is not None else None
    ((result, seconds),) = batches_here(model, x, y, cfg, src, [batch])
    return result.to("cpu"), seconds


class RayEvaluator:
    """A :data:`ancra_tune.robustness.BatchRunner` that runs an evaluation's batches as Ray tasks of
    ``cpus`` CPUs (and ``gpus`` GPUs) each, at most ``workers`` at once, a free worker taking the
    next batch; with ``progress`` a bar counts the batches."""

    def __init__(self, workers: int, *, cpus: float = 1.0, gpus: float = 0.0, progress: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"--workers {workers} is invalid: must be >= 1")
        self.workers, self.cpus, self.gpus, self.progress = workers, cpus, gpus, progress

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, cfg: SuiteConfig, source: nn.Module | None,
                 batches: Sequence[int]) -> Iterator[tuple[BatchResult, float]]:
        """Each of ``batches`` with the seconds it took on its worker, as it comes back; closed or
        stopped early, the tasks in flight are called off."""
        import ray

        todo = list(batches)
        if not todo:
            return
        if len(todo) < self.workers:
            print(f"note: {len(todo)} batch(es) of {cfg.batch_size} to evaluate for {self.workers} workers: only "
                  f"{len(todo)} can work; a smaller --batch-size gives more batches", flush=True)
        device = "cuda" if self.gpus > 0 else "cpu"
        task = ray.remote(_eval_batch).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=2)
        refs = [ray.put(v) for v in (model.cpu(), x, y, source.cpu() if source is not None else None)]
        threads = max(1, int(math.floor(self.cpus)))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"batches on {self.workers} workers", dynamic_ncols=True)
        pending: dict[object, int] = {}
        try:
            while todo or pending:
                while todo and len(pending) < self.workers:
                    pending[task.remote(*refs[:3], cfg, refs[3], todo.pop(0), device, threads)] = 0
                done, _ = ray.wait(list(pending), num_returns=1)
                del pending[done[0]]
                result, seconds = ray.get(done[0])
                if bar is not None:
                    bar.update(1)
                yield result, seconds
        finally:  # a stop (Ctrl+C), a failed batch, or the caller closed it
            for ref in pending:
                ray.cancel(ref, force=True)
            if bar is not None:
                bar.close()


def cluster_check(cpus: float, gpus: float, nodes: list[dict[str, float]]) -> None:
    """Fail fast when not even one shard task fits any node."""
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
        raise RuntimeError(f"an evaluation worker needs {cpus:g} CPU and {gpus:g} GPU, but no node has that "
                           f"({have}); lower --cpus-per-worker or add nodes")


def ray_evaluator(workers: int, *, address: str | None = None, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0, progress: bool = False) -> RayEvaluator:
    """Join or start Ray, check that a batch's task fits, and return the ``run`` that
    :func:`ancra_tune.robustness.evaluate_checkpoint` runs the batches with."""
    from .ray_session import alive_nodes, init_ray

    init_ray(address)
    cluster_check(cpus_per_worker, gpus_per_worker, alive_nodes())
    return RayEvaluator(workers, cpus=cpus_per_worker, gpus=gpus_per_worker, progress=progress)
