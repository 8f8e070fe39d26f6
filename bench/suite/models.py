"""The suite's architectures, built in code (torchvision cannot be installed beside the CPU torch).

Each factory takes the input shape (C, H, W) and the number of classes and returns an untrained module whose
every layer is an ``nn.Module`` attribute, so torch.fx names nodes after them.  They differ in what matters to
a detector: depth, normalisation, residual adds, depthwise convolutions, ReLU6, dropout, no convolution at all.
``resnet18`` is torchvision's at its real size (from tests/zoo.py, which copies torchvision's block patterns).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from harden.examples.lenet import LeNet5
from tests import zoo


def lenet5(shape, classes: int) -> nn.Module:
    if tuple(shape) != (1, 28, 28):
        raise ValueError(f"LeNet-5 takes 1x28x28 inputs, not {shape}")
    return LeNet5(classes)


class PlainCNN(nn.Module):
    """Two 3x3 convolutions, one pool, two fully connected layers: the smallest thing a user would train."""

    def __init__(self, shape, classes: int):
        super().__init__()
        c, h, w = shape
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * (h // 2) * (w // 2), 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = self.flatten(self.pool(x))
        return self.fc2(self.relu3(self.fc1(x)))


class MLP(nn.Module):
    """No convolution: flatten, 256, 128, classes."""

    def __init__(self, shape, classes: int):
        super().__init__()
        c, h, w = shape
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, 256)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(256, 128)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv-BN-ReLU-conv-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small BN ResNet: stem, three stages of one basic block (16, 32, 64 channels), global average pool."""

    def __init__(self, shape, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(shape[0], 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class SeparableBlock(nn.Module):
    """MobileNet's depthwise-separable unit: depthwise 3x3-BN-ReLU6, pointwise 1x1-BN-ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU6()
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU6()

    def forward(self, x):
        return self.relu2(self.bn2(self.pointwise(self.relu1(self.bn1(self.depthwise(x))))))


class MobileNet(nn.Module):
    """A small MobileNet-v1: a strided stem, four separable blocks, global average pool."""

    def __init__(self, shape, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(shape[0], 16, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU6()
        self.block1 = SeparableBlock(16, 32, 2)
        self.block2 = SeparableBlock(32, 32, 1)
        self.block3 = SeparableBlock(32, 64, 2)
        self.block4 = SeparableBlock(64, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(self.flatten(self.pool(x)))


class VGG(nn.Module):
    """VGG-style: two conv-conv-pool stages (32, 64 channels), a dropout classifier head."""

    def __init__(self, shape, classes: int):
        super().__init__()
        c, h, w = shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.drop1 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.relu5 = nn.ReLU()
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        x = self.drop1(self.flatten(x))
        return self.fc2(self.drop2(self.relu5(self.fc1(x))))


def resnet18(shape, classes: int) -> nn.Module:
    """torchvision's ResNet-18 at full width (11.2M parameters; 7x7/2 stem and max pool), built by tests/zoo.py."""
    return zoo.resnet18(shape[0], classes, size="full")


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "cnn": PlainCNN,
    "mlp": MLP,
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "vgg": VGG,
    "resnet18": resnet18,
}


def build(arch: str, shape, classes: int, seed: int) -> nn.Module:
    """``arch``: a key of ARCHITECTURES, or ``zoo:FAMILY`` (a family of tests/zoo.py at full size)."""
    torch.manual_seed(seed)
    if arch.startswith("zoo:"):
        return zoo.build(arch[4:], shape[0], classes, size="full", seed=seed)
    return ARCHITECTURES[arch](tuple(shape), classes)
