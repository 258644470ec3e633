"""MobileNetV2 (Sandler et al. 2018) with a width multiplier.

Inverted residual blocks: 1x1 expand → 3x3 depthwise → 1x1 project (linear bottleneck), with a
residual add when stride is 1 and channels match. For inputs of 64 px or less the stem keeps
stride 1 (CIFAR-style), so 32x32 digits keep spatial detail (total stride 16 instead of 32).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MobileNetV2", "mobilenet_v2", "imagenet_224", "digits_classifier", "digits_teacher"]

_SETTINGS = [  # expansion t, channels c, repeats n, stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu(cin, hidden, 1, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
        super().__init__()
        # kept so a copy at another width can be built (edgecomp distill --shrink width=W)
        self.width, self.num_classes, self.in_channels, self.input_size = width, num_classes, in_channels, input_size
        small = input_size <= 64
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers = [_conv_bn_relu(in_channels, cin, 3, 1 if small else 2)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width)
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v2(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
    return MobileNetV2(width, num_classes, in_channels, input_size).eval()


def imagenet_224(width: float = 1.0):
    """MobileNetV2 at 3x224x224, random init (latency and pruning benchmarks)."""
    torch.manual_seed(0)
    return mobilenet_v2(width).eval(), (torch.randn(1, 3, 224, 224),)


def digits_classifier(width: float = 0.5):
    """The trained digits classifier (1x32x32 input, 10 classes); train it with ``python -m models.digits``."""
    from models.digits import load_trained

    return load_trained("mobilenet_v2", width)


def digits_teacher():
    """Width 1.0 digits classifier (the distillation teacher)."""
    return digits_classifier(1.0)
