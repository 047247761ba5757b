"""What scoring the surrogates' visited points from their own forward pass saves.

An attack through a surrogate of RA's gate (``robustness.adaptive``) must score every point it
visits on the real model (the argmax gate), because the surrogate only guides it. It used to do so
with a second forward pass of the real model per step; now the surrogate's pass gives the real P'
too (``RANet.forward(..., real=True)``): nothing runs twice for the straight-through gate and the
plain targets (aux, sum), and for the label and soft gates only the blocks after the first gate run
again, without autograd.

For each surrogate target this times PGD-k on one batch both ways, in alternation (the median of
``--repeats`` runs each), checks that both give the same AEs, and prints the model's forward calls
(the steps' and the last iterate's scoring) and the time ratio. Timing does not depend on the
weights, so the models are freshly initialised: the small CNN on 28x28 greyscale inputs (the MNIST
model) and ResNet-18 on 32x32 colour inputs (the paper's CIFAR-10 model; its last stage is two
blocks, both RA).

    python benchmarks/surrogate_passes.py                 # one thread, small CNN and ResNet-18
    python benchmarks/surrogate_passes.py --models small_cnn --n 200 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ancra_tune.attacks import pgd
from ancra_tune.models import create_model
from ancra_tune.robustness import adaptive
from ancra_tune.robustness.suite import SURROGATES

SHAPES = {"small_cnn": (1, 28), "resnet18": (3, 32), "preact_resnet18": (3, 32)}


class SeparatePass(adaptive.SurrogateModel):
    """The scoring before: the real model's own forward pass on every visited point, then the
    surrogate's."""

    def forward(self, x: torch.Tensor, gate_labels: torch.Tensor | None = None):
        self.tracker.observe(x, self.rows)
        return adaptive.surrogate_output(self.model, x, self.target, self.labels, self.temperature)


def run(model, x, y, target: str, *, steps: int, eps: float, separate: bool) -> tuple[float, int, torch.Tensor]:
    calls = [0]
    handle = model.register_forward_hook(lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
    try:
        tracker = adaptive.Tracker(model, x, y)
        wrapper = (SeparatePass if separate else adaptive.SurrogateModel)(model, target, y, tracker, 1.0)
        t0 = time.perf_counter()
        last = pgd(wrapper, x, y, eps=eps, step_size=eps / 4, steps=steps, bn="eval",
                   loss_fn=adaptive.pgd_loss(target), generator=torch.Generator().manual_seed(0))
        tracker.observe(last, wrapper.rows)
        seconds = time.perf_counter() - t0
    finally:
        handle.remove()
    return seconds, calls[0], tracker.result(last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"], choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=None, help="batch size (default: 200 small CNN, 32 ResNet-18)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), PGD-{args.steps}, median of "
          f"{args.repeats} alternating runs")
    print("| model | n | surrogate | forward calls before | after | seconds before | after | after / before "
          "| same AEs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        c, s = SHAPES[name]
        n = args.n or (200 if name == "small_cnn" else 32)
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=c, ra=True).eval()
        x, y = torch.rand(n, c, s, s), torch.randint(0, 10, (n,))
        totals = {False: 0.0, True: 0.0}
        for target in SURROGATES:
            times: dict[bool, list[float]] = {False: [], True: []}
            calls, out = {}, {}
            for _ in range(args.repeats):
                for separate in (True, False):
                    sec, k, adv = run(model, x, y, target, steps=args.steps, eps=args.eps, separate=separate)
                    times[separate].append(sec)
                    calls[separate], out[separate] = k, adv
            before, after = statistics.median(times[True]), statistics.median(times[False])
            totals[True] += before
            totals[False] += after
            same = torch.equal(out[True], out[False])
            print(f"| {name} | {n} | {target} | {calls[True]} | {calls[False]} | "
                  f"{before:.2f} | {after:.2f} | {after / before:.2f} | {'yes' if same else 'NO'} |", flush=True)
        print(f"| {name} | {n} | all five | | | {totals[True]:.2f} | {totals[False]:.2f} | "
              f"{totals[False] / totals[True]:.2f} | |", flush=True)


if __name__ == "__main__":
    main()
