"""CIFAR-style ResNet-18 (He et al.) and PreActResNet-18, as used by the paper.

Both follow the authors' released models (``TRADES-ANCRA/models/resnet.py`` and
``preactresnet.py``); RA sits in both blocks of the last stage (layer4).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import RANet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _stage(block: type[nn.Module], in_planes: int, planes: int, n: int, stride: int) -> list[nn.Module]:
    layers = []
    for s in [stride] + [1] * (n - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes
    return layers


class ResNet18(RANet):
    """ResNet-18 as released (``ResNet18_RA``): stem conv-BN-ReLU, layer1-3 in the stem, layer4's two
    BasicBlocks as the last stage. Each block's ReLU output z gives P = fc(avgpool(z)); with RA,
    z is multiplied channel-wise by the gate's classifier row and fed to the next block; P' is
    fc of the last block's pooled, weighted output (512-d)."""

    def __init__(self, *, num_classes: int, in_channels: int, mean, std, ra: bool,
                 ra_feed_weighted: bool = True) -> None:
        super().__init__(mean=mean, std=std, ra=ra, ra_feed_weighted=ra_feed_weighted)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            *_stage(BasicBlock, 64, 64, 2, 1),
            *_stage(BasicBlock, 64, 128, 2, 2),
            *_stage(BasicBlock, 128, 256, 2, 2),
        )
        self.last_stage = nn.ModuleList(_stage(BasicBlock, 256, 512, 2, 2))
        self.post = nn.Identity()
        self.fc = nn.Linear(512, num_classes)


class PreActResNet18(RANet):
    """PreActResNet-18 as released for Tiny-ImageNet (``PreActResNet18_RA``).

    The readout is the final BN-ReLU, then a 2 x 2 average-pooling grid flattened: 512 channels x
    4 cells = a 2048-d feature (the released ``avg_pool2d(out, 4)`` of the 8 x 8 map of 64 x 64
    inputs), so the classifier is 2048 -> K. With RA the shared BN-ReLU runs inside each RA block
    and its output is fed forward; RA weights each channel's quadrant by its own classifier entry
    (the released mask repeats each of a channel's 4 weights over its 4 x 4 quadrant)."""

    pool_grid = 2
    post_in_ra_blocks = True

    def __init__(self, *, num_classes: int, in_channels: int, mean, std, ra: bool,
                 ra_feed_weighted: bool = True) -> None:
        super().__init__(mean=mean, std=std, ra=ra, ra_feed_weighted=ra_feed_weighted)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            *_stage(PreActBlock, 64, 64, 2, 1),
            *_stage(PreActBlock, 64, 128, 2, 2),
            *_stage(PreActBlock, 128, 256, 2, 2),
        )
        self.last_stage = nn.ModuleList(_stage(PreActBlock, 256, 512, 2, 2))
        # Pre-activation nets end in BN-ReLU; the auxiliary P of a block reads its output through it.
        self.post = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU())
        self.fc = nn.Linear(512 * self.pool_grid ** 2, num_classes)
