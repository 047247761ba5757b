"""WideResNet-28-10 and WRN-34-10 (Zagoruyko & Komodakis), the TRADES/MART variant, with RA
as in the authors' released ``WideResNet_ANCRA`` (``TRADES-ANCRA/models/wideresnet.py``).
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
    """WRN-depth-widen. RA sits on the last two blocks of the last (64 x widen channels) group only;
    the group's earlier blocks belong to the stem. The network's final BN-ReLU (``post``) is shared:
    with RA on it runs inside each of the two RA blocks, whose BN-ReLU output gives P and, weighted
    by the gate's classifier row, feeds the next block; P' is fc of the last one's pooled weighted
    output. Without RA, ``post`` runs once after the last block (the plain WRN)."""

    post_in_ra_blocks = True

    def __init__(self, *, depth: int, widen: int, num_classes: int, in_channels: int, mean, std,
                 ra: bool, ra_feed_weighted: bool = True) -> None:
        super().__init__(mean=mean, std=std, ra=ra, ra_feed_weighted=ra_feed_weighted)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]

        def group(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]

        last_group = group(widths[2], widths[3], 2)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            *group(widths[0], widths[1], 1),
            *group(widths[1], widths[2], 2),
            *last_group[:-2],
        )
        self.last_stage = nn.ModuleList(last_group[-2:])  # the released RA blocks
        self.post = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.fc = nn.Linear(widths[3], num_classes)
