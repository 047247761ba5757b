"""A trial's evaluation takes a CPU nobody holds (trainables.spare_cpus): inside a trial's placement
group, as Tune runs it, a helper on the cluster's free CPU evaluates some of the batches, and the
outcomes are those of the evaluation run alone in one process."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import digits_splits, trained_digits_model

from ancra_tune.robustness import SuiteConfig, build_report
from ancra_tune.robustness.kept import evaluate_kept


def _evaluate_in_trial(model, x, y, suite, threads):
    """What a trial does, in a task of its placement group: the evaluation with SpareCpus."""
    from trainables.spare_cpus import SpareCpus

    torch.set_num_threads(threads)
    run = SpareCpus(threads=threads)
    results, seconds, *_ = evaluate_kept(model, x, y, suite, kept=None, meta={}, run=run)
    return results, run.helped


@pytest.mark.ray
@pytest.mark.parametrize("someone_waits", [False, True])
def test_a_spare_cpu_takes_batches_from_inside_a_trials_placement_group(ray_local, someone_waits: bool) -> None:
    """Free: the helper takes the last batches. Someone waiting for resources (a placement group not
    yet placed: the next trial): no helper starts. The outcomes are the same either way."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = digits_splits()
    x, y = s.val.images[:64].float() / 255, s.val.labels[:64]
    model = trained_digits_model()
    suite = SuiteConfig.preset_config("quick", eps=0.15, batch_size=8, autoattack=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, *_ = evaluate_kept(model, x, y, suite, kept=None, meta={})
    finally:
        torch.set_num_threads(threads)
    # A trial's placement group (one CPU, held by the trial), capturing its child tasks as Tune's do;
    # the local Ray has 2 CPUs: one is free.
    from ray.util.state import list_actors

    def helpers() -> dict:
        return {a.actor_id: a for a in list_actors(filters=[("class_name", "=", "_Helper")], detail=True)}

    before = set(helpers())
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    waiting = placement_group([{"CPU": 2}]) if someone_waits else None  # cannot be placed while the trial runs
    try:
        inside = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        task = ray.remote(_evaluate_in_trial).options(num_cpus=1, scheduling_strategy=inside)
        results, helped = ray.get(task.remote(model, x, y, suite, 1), timeout=600)
    finally:
        for group in (pg, waiting):
            if group is not None:
                remove_placement_group(group)
    assert sorted(r.batch_idx for r in results) == list(range(8))
    a, b = (build_report(r, suite, ra=False, n_classes=10, has_source=False, meta={}).to_dict()
            for r in (alone, results))
    assert a["n_examples"] == 64 and a == b  # every attack's per-example outcome
    if someone_waits:
        assert helped == [] and set(helpers()) == before  # none was even asked for
        return
    assert helped and all(b >= 4 for b in helped), helped  # the last batches, from the end
    # The helper ran on the free CPU, outside the trial's group (inside it, it would have shared the
    # trial's CPU whenever the trial waited on Ray, and left the free one idle).
    started = [a for k, a in helpers().items() if k not in before]
    assert started and all(not a.placement_group_id for a in started), started
