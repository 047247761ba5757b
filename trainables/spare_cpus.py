"""A trial's evaluation takes a CPU nobody holds: the study's last trial alone, a slot left empty.

An ablation runs its trials a few at a time; at its end the last one runs alone, and its evaluation
(hours for a robust model on a CPU) has the other trials' CPUs idle beside it. :class:`SpareCpus`
runs the evaluation's batches here, in order, and whenever the Ray cluster has a CPU that no one
holds it starts a helper there (an actor of one CPU, with this process's threads) and hands it
the last batch left, then the next, while one is left beside the batch here. A batch goes to the
helper only once the helper is alive, so none waits for a CPU that never comes; a helper that
never got one is called off at the end. The helper is polite: none starts, and a running one is
let go after its batch, while anyone waits for resources (a placement group not yet placed: a
trial Tune is starting, a Ray Train worker group). Each batch's attacks draw their randomness from the
batch's own index, and the helper computes with the same weights and threads, so the outcomes are
those of the batch run here (``tests/test_spare_cpus.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ancra_tune.robustness import BatchResult, SuiteConfig
from ancra_tune.robustness.kept import batches_here

log = logging.getLogger(__name__)

WAIT_ALIVE_S = 30.0  # how long a new helper is waited for before the batch here starts (once)


class _Helper:
    """The Ray actor that evaluates batches it is handed."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, suite: SuiteConfig, source: nn.Module | None,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.model, self.x, self.y, self.suite = model.eval(), x, y, suite
        self.source = source.eval() if source is not None else None

    def ready(self) -> bool:
        return True

    def batch(self, b: int) -> tuple[BatchResult, float]:
        ((result, seconds),) = batches_here(self.model, self.x, self.y, self.suite, self.source, [b])
        return result, seconds


class SpareCpus:
    """A :data:`ancra_tune.robustness.BatchRunner` for a trial on the CPU inside a Ray cluster."""

    def __init__(self, *, threads: int | None = None, cpus: float = 1.0) -> None:
        self.threads = threads or torch.get_num_threads()
        self.cpus = cpus
        self.helped: list[int] = []  # the batches a helper evaluated

    def _free(self) -> bool:
        """A CPU no one holds and no one waits for."""
        import ray

        return ray.available_resources().get("CPU", 0.0) >= self.cpus and not self._wanted()

    @staticmethod
    def _wanted() -> bool:
        """Someone waits for resources: a placement group not placed yet (a trial Tune is starting, a
        Ray Train worker group). The helper then lets its CPU go after its batch."""
        from ray.util import placement_group_table

        return any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in placement_group_table().values())

    def __call__(self, model: Any, x: Tensor, y: Tensor, suite: SuiteConfig, source: nn.Module | None,
                 batches: list[int]) -> Iterator[tuple[BatchResult, float]]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        todo = list(batches)
        actor: Any = None
        alive: Any = None  # its ready() reference until it has answered
        given: tuple[Any, int] | None = None  # (reference, batch) it is working on
        broken = False  # a helper failed: no other is started
        try:
            while todo or given is not None:
                if given is not None and ray.wait([given[0]], timeout=0)[0]:
                    ref, b = given
                    given = None
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:  # its node went away: the batch is done here
                        log.warning("evaluation: the helper on a spare CPU failed (%s); batch %d runs here", e, b)
                        todo.append(b)
                        ray.kill(actor)
                        actor, broken = None, True
                        continue
                    self.helped.append(b)
                    yield result
                    continue
                if actor is None and not broken and len(todo) >= 2 and self._free():
                    # Outside the trial's placement group (Tune's trials capture their child tasks in
                    # it, whose CPU the trial holds): a CPU of the cluster's own.
                    actor = ray.remote(_Helper).options(
                        num_cpus=self.cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
                    ).remote(model, x, y, suite, source, self.threads)
                    alive = actor.ready.remote()
                    ray.wait([alive], timeout=WAIT_ALIVE_S)  # a process to start: seconds, against a batch's minutes
                if alive is not None and ray.wait([alive], timeout=0)[0]:
                    alive = None
                    log.info("evaluation: a spare CPU helps with the last batches")
                if actor is not None and alive is None and given is None and len(todo) >= 2:
                    if self._wanted():  # its CPU goes to whoever waits; another helper may come later
                        ray.kill(actor)
                        actor = None
                    else:
                        b = todo.pop()
                        given = (actor.batch.remote(b), b)
                if todo:
                    yield from batches_here(model, x, y, suite, source, [todo.pop(0)])
                elif given is not None:
                    ray.wait([given[0]])  # its last batch, running: back at the top of the loop
        finally:
            if actor is not None:
                ray.kill(actor)


def for_trial(model: nn.Module) -> SpareCpus | None:
    """How a trial's evaluation runs its batches: with :class:`SpareCpus` for a model on the CPU inside a
    Ray cluster; otherwise (a GPU's evaluation, or no Ray) ``None``, all of them in the trial."""
    import ray

    if next(model.parameters()).device.type != "cpu" or not ray.is_initialized():
        return None
    return SpareCpus()
