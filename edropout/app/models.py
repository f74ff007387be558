"""Small networks for the main job and the tests: MLP, LeNet-style, CIFAR-style ResNet-18, AlexNet-style and
SqueezeNet-style (fire modules with concat), for grey or colour inputs of any size from 8×8 up, width-scalable.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _flat_size(features: nn.Module, in_channels: int, input_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, input_size, input_size)).numel()


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation for ReLU nets: PyTorch's default shrinks activations layer after layer,
    and the deep plain (BatchNorm-free) nets then do not train at narrow widths."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class MLP(nn.Module):
    """Two hidden layers of ``width`` features."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size ** 2, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    """Two 5×5 conv layers with max-pooling, then two hidden fully connected layers."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        flat = _flat_size(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 8 * width), nn.ReLU(),
                                        nn.Linear(8 * width, 4 * width), nn.ReLU(),
                                        nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a residual add (1×1 conv-BN shortcut when the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: a 3×3 stem, four stages of two basic blocks (width, 2w, 4w, 8w), global pooling."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class AlexNet(nn.Module):
    """Five conv layers (three max-pools) and a dropout classifier with two hidden layers."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 3 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3 * width, 6 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * width, 16 * width), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(16 * width, 16 * width), nn.ReLU(), nn.Linear(16 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class Fire(nn.Module):
    """SqueezeNet fire module: 1×1 squeeze, then 1×1 and 3×3 expands concatenated along channels."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1(s)), self.relu(self.expand3(s))], dim=1)


class SqueezeNet(nn.Module):
    """A stem conv, four fire modules with one max-pool, and a 1×1 conv classifier with global pooling."""

    def __init__(self, in_channels=1, input_size=28, num_classes=10, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 4 * w, 3, padding=1), nn.ReLU(),
            Fire(4 * w, w, 2 * w), Fire(4 * w, w, 2 * w), nn.MaxPool2d(2),
            Fire(4 * w, 2 * w, 4 * w), Fire(8 * w, 2 * w, 4 * w))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8 * w, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"mlp": MLP, "lenet": LeNet, "resnet18": ResNet18, "alexnet": AlexNet, "squeezenet": SqueezeNet}
DEFAULT_WIDTH = {"mlp": 256, "lenet": 16, "resnet18": 16, "alexnet": 16, "squeezenet": 16}


def build_model(name: str, in_channels: int = 1, input_size: int = 28, num_classes: int = 10, width=None):
    """A fresh model by name; ``width`` scales every layer (default per model in ``DEFAULT_WIDTH``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)}")
    return he_init(MODELS[name](in_channels, input_size, num_classes, width or DEFAULT_WIDTH[name]))
