"""WideResNet-28-10 and WRN-34-10 (Zagoruyko & Komodakis), the TRADES/MART variant.

RA sits in every block of the last (640-channel) group.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import RANet


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(RANet):
    def __init__(self, *, depth: int, widen: int, num_classes: int, in_channels: int, mean, std,
                 ra: bool, ra_feed_weighted: bool = True) -> None:
        super().__init__(mean=mean, std=std, ra=ra, ra_feed_weighted=ra_feed_weighted)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]

        def group(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            *group(widths[0], widths[1], 1),
            *group(widths[1], widths[2], 2),
        )
        self.last_stage = nn.ModuleList(group(widths[2], widths[3], 2))
        self.post = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.fc = nn.Linear(widths[3], num_classes)
