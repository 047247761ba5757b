"""Data-parallel helpers in plain torch.distributed (no Ray): synchronised BatchNorm that also
works on CPU/gloo, and collective checks.

With DDP each worker sees B/W examples. Plain BatchNorm then normalises with per-worker
statistics, so W workers do not train the same model as one worker with the whole batch.
:class:`SyncBatchNorm2d` all-reduces the batch sums (differentiably) so the statistics are
those of the global batch, on any device; on CUDA torch's own SyncBatchNorm is used instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the batches of all workers."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])  # (2C + 1,)
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Synchronise every BatchNorm2d across the workers, keeping parameters and buffers: torch's
    own :class:`torch.nn.SyncBatchNorm` (CUDA kernels, NCCL) for a model on a GPU, else
    :class:`SyncBatchNorm2d`. In place for a model that is not itself a BatchNorm layer."""
    first = next(iter(module.parameters()), None)
    if first is not None and first.is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_portable(module)


def _convert_portable(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        setattr(module, name, _convert_portable(child))
    return module


def ddp_wrap(model: nn.Module, device: torch.device, *, sync_batchnorm: bool = True) -> nn.Module:
    """The model as a data-parallel worker trains it: BatchNorm synchronised (in place, so the
    bare model that attacks, checkpoints and validates sees the same layers), wrapped in DDP.

    DDP does not broadcast buffers. Its broadcast writes rank 0's running statistics into every
    BatchNorm in place before each forward, and an ANCRA step makes three train-mode forwards
    before one backward; on CUDA, cuDNN's BatchNorm keeps the running statistics for its
    backward, so the second broadcast invalidates the first forward's graph (autograd: "modified
    by an inplace operation"). With synchronised BatchNorm every rank computes the same running
    statistics anyway; without it each rank keeps its own, and rank 0's are the ones saved.
    """
    if sync_batchnorm:
        convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every worker iff ``flag`` is True on every worker (one all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0
