"""A small CNN that trains in seconds on a CPU (digits, MNIST, CIFAR-sized inputs).

Two conv-BN-ReLU pairs with max-pooling form the stem; the last stage is two
conv-BN-ReLU blocks of 128 channels, where RA sits; global average pooling feeds a
linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import RANet


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = _conv_bn_relu(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class SmallCNN(RANet):
    def __init__(self, *, num_classes: int, in_channels: int, mean, std, ra: bool,
                 ra_feed_weighted: bool = True, width: int = 32) -> None:
        super().__init__(mean=mean, std=std, ra=ra, ra_feed_weighted=ra_feed_weighted)
        w = width
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, w), _conv_bn_relu(w, w), nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
        )
        self.last_stage = nn.ModuleList([ConvBlock(2 * w, 4 * w), ConvBlock(4 * w, 4 * w)])
        self.post = nn.Identity()
        self.fc = nn.Linear(4 * w, num_classes)
