"""CUDA code paths: bf16 autocast, channels-last, torch's SyncBatchNorm under NCCL, one training
step on the GPU against the same step on the CPU. Skipped where no GPU is present (conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import digits_splits

from ancra_tune.checkpoint import build_model
from ancra_tune.config import TrainConfig
from ancra_tune.distributed import all_true, ddp_wrap
from ancra_tune.step import ancra_step
from ancra_tune.trainer import Trainer

pytestmark = pytest.mark.gpu

BASE = {"data.dataset": "digits", "data.val_size": 0.2, "data.batch_size": 64, "model.name": "small_cnn",
        "method.base_loss": "trades", "method.anc": True, "model.ra": True, "attack.eps": 0.2,
        "attack.step_size": 0.05, "attack.steps": 3, "progress": False}


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 would make fp32 on the GPU differ from the CPU by ~1e-3; the comparisons below are of
    # the arithmetic, not of TF32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _step(cfg: TrainConfig, device: str, splits) -> tuple[float, torch.Tensor, dict]:
    """The loss and the flattened weight gradient of one ANCRA step on the first 64 examples."""
    torch.manual_seed(0)
    model = build_model(cfg, splits.info).to(device)
    if cfg.channels_last and device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = splits.train.images[:64].float().div(255).to(device)
    y = splits.train.labels[:64].to(device)
    loss, parts = ancra_step(model, x, y, cfg=cfg, epoch=0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    grad = torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])
    return loss.item(), grad, {k: float(v) for k, v in parts.items()}


def test_one_step_on_cuda_equals_the_cpu_step() -> None:
    splits = digits_splits()
    cfg = TrainConfig.from_dict(BASE)
    loss_cpu, g_cpu, _ = _step(cfg, "cpu", splits)
    loss_gpu, g_gpu, _ = _step(cfg, "cuda", splits)
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(g_cpu, g_gpu, dim=0) > 0.999


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_stays_close_to_fp32(tmp_path) -> None:
    splits = digits_splits()
    seen: list[torch.dtype] = []
    cfg16 = TrainConfig.from_dict({**BASE, "precision": "bf16"})
    torch.manual_seed(0)
    model = build_model(cfg16, splits.info).cuda()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = splits.train.images[:64].float().div(255).cuda()
    y = splits.train.labels[:64].cuda()
    loss16, parts = ancra_step(model, x, y, cfg=cfg16, epoch=0, generator=torch.Generator().manual_seed(1))
    assert seen and set(seen) == {torch.bfloat16}  # attacks and loss ran under autocast
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    loss32, _, _ = _step(TrainConfig.from_dict(BASE), "cuda", splits)
    assert loss16.item() == pytest.approx(loss32, rel=0.05)
    # A whole epoch in bf16 lowers the loss (the optimizer sees usable gradients).
    t = Trainer(TrainConfig.from_dict({**BASE, "precision": "bf16", "data.train_limit": 640, "optim.epochs": 3,
                                       "optim.lr": 0.05, "eval.pgd_steps": 0, "eval.max_examples": 64}),
                device="cuda", out_dir=tmp_path)
    losses = [t.train_epoch(e)["loss"] for e in range(3)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


def test_channels_last_keeps_the_step(tmp_path) -> None:
    splits = digits_splits()
    loss_a, g_a, _ = _step(TrainConfig.from_dict(BASE), "cuda", splits)
    loss_b, g_b, _ = _step(TrainConfig.from_dict({**BASE, "channels_last": True}), "cuda", splits)
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(g_a, g_b, dim=0) > 0.9999
    t = Trainer(TrainConfig.from_dict({**BASE, "channels_last": True, "out_dir": str(tmp_path)}), device="cuda")
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_nccl_with_torchs_sync_batchnorm(tmp_path) -> None:
    """What a Ray Train worker on a GPU does: NCCL process group, torch's SyncBatchNorm, DDP; one
    ANCRA step (three train-mode forwards, one backward) through it equals the bare model's."""
    splits = digits_splits()
    cfg = TrainConfig.from_dict(BASE)
    x = splits.train.images[:64].float().div(255).cuda()
    y = splits.train.labels[:64].cuda()
    cuda = torch.device("cuda")

    def fresh():
        torch.manual_seed(0)
        return build_model(cfg, splits.info).cuda()

    def step(m):
        loss, _ = ancra_step(m, x, y, cfg=cfg, epoch=0, generator=torch.Generator().manual_seed(1))
        loss.backward()
        return loss.item()

    bare = fresh()
    reference = step(bare)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        model = fresh()
        ddp = ddp_wrap(model, cuda)  # what trainables/worker.py wraps with
        kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        assert kinds == {torch.nn.SyncBatchNorm}  # in place: the bare model has the synchronised layers
        assert ddp.module is model
        assert step(ddp) == pytest.approx(reference, rel=1e-5)  # one worker: the same statistics
        for p, q in zip(bare.parameters(), model.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-5)
        # Without synchronised BatchNorm (resources.sync_batchnorm false): cuDNN's BatchNorm, three
        # forwards before one backward, and DDP must leave the running statistics alone.
        unsynced = ddp_wrap(fresh(), cuda, sync_batchnorm=False)
        assert step(unsynced) == pytest.approx(reference, rel=1e-5)
        assert all_true(True, cuda) and not all_true(False, cuda)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
