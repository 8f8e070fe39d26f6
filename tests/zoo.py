"""The block patterns of torchvision and timm classifiers, built in code (torchvision cannot be installed beside
the pinned CPU torch), at tiny widths for tests and at real size for bench/.

Each family copies what its source writes, because that is what torch.fx and torch.export see: the same module
tree and names (RegNet's ``block1-0``, shared ``nn.ReLU(inplace=True)`` modules called twice, in-place adds),
the same functional spellings (``torch.flatten``, ``x.chunk``, ``torch._assert``, channel shuffle by
view/transpose of sizes, class tokens expanded to the batch, ``F.scaled_dot_product_attention``), the same
activations (ReLU, ReLU6, hardswish, hardsigmoid, SiLU, sigmoid, GELU, ...) and the same helpers
(:func:`stochastic_depth`, torch.fx-wrapped as torchvision wraps it).

``build(family, in_channels, classes, size)`` returns an untrained module; ``size="tiny"`` takes 8x8 inputs (the
tests' scikit-learn digits), ``size="full"`` the torchvision widths for 32x32 inputs.  Every family is also a
zero-argument factory of its tiny 1-channel, 10-class form, for ``--arch tests.zoo:<family>``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- torchvision.ops helpers


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision.ops.stochastic_depth as torchvision writes it: identity in eval."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# torchvision wraps it for torch.fx, so a symbolically traced model holds one call to it; the qualified name is
# torchvision's, which is what harden sees in a user's graph.
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: conv, batch norm, activation (in place), as a Sequential."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU, inplace: Optional[bool] = True):
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups,
                                             bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(cout))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation: the gate is ``scale_activation`` (Sigmoid, or Hardsigmoid)."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# ----------------------------------------------------------------------------- ResNet (basic, bottleneck)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)   # one module, called twice
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool."""

    def __init__(self, block, layers: list[int], widths: list[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for i, (count, width) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(block, width, count, stride=1 if i == 0 else 2))
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ----------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, 1, activation_layer=nn.ReLU6))
        layers += [Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, activation_layer=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, setting: list[list[int]], first: int, last: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        features: list[nn.Module] = [Conv2dNormActivation(in_channels, first, stride=2, activation_layer=nn.ReLU6)]
        cin = first
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(Conv2dNormActivation(cin, last, 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- MobileNetV3


class V3Block(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual: hardswish or ReLU, squeeze-excitation gated by hardsigmoid."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, use_hs: bool, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=activation))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                           activation_layer=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, setting: list[tuple], first: int, last_conv: int, last: int, in_channels: int = 3,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, first, stride=2, activation_layer=nn.Hardswish)]
        cin = first
        for kernel, expanded, cout, use_se, use_hs, stride in setting:
            layers.append(V3Block(cin, kernel, expanded, cout, use_se, use_hs, stride))
            cin = cout
        layers.append(Conv2dNormActivation(cin, last_conv, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last), nn.Hardswish(inplace=True), nn.Dropout(p=0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- EfficientNet (MBConv)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: float, sd_prob: float):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = _make_divisible(cin * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                           activation_layer=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, setting: list[tuple], first: int, last: int, in_channels: int = 3, num_classes: int = 10,
                 stochastic_depth_prob: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, first, stride=2, activation_layer=nn.SiLU)]
        total = sum(n for *_, n in setting)
        done, cin = 0, first
        for expand, kernel, stride, cout, n in setting:
            stage = []
            for i in range(n):
                stage.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand,
                                    stochastic_depth_prob * done / total))
                cin = cout
                done += 1
            layers.append(nn.Sequential(*stage))
        layers.append(Conv2dNormActivation(cin, last, 1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, bias=False), nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats: list[int], channels: list[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = channels[0]
        for name, count, cout in zip(["stage2", "stage3", "stage4"], repeats, channels[1:]):
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(count - 1)]
            setattr(self, name, nn.Sequential(*units))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])
        return self.fc(x)


# ----------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, cin: int, bn_size: int, growth: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth: int, blocks: tuple, init: int, bn_size: int, in_channels: int = 3,
                 num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, init, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(init)),
            ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]))
        channels = init
        for i, count in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(count, channels, bn_size, growth))
            channels += count * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# ----------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """torchvision's squeezenet1_1 layout."""

    def __init__(self, fires: list[tuple], first: int, in_channels: int = 3, num_classes: int = 10, stride: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, first, 3, stride=stride), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)]
        for i, fire in enumerate(fires):
            layers.append(Fire(*fire))
            if i == 1:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        last = fires[-1][2] + fires[-1][3]
        final_conv = nn.Conv2d(last, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.classifier(self.features(x))
        return torch.flatten(x, 1)


# ----------------------------------------------------------------------------- RegNet (Y: squeeze-excitation)


class BottleneckTransform(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        groups = cout // group_width
        layers["a"] = Conv2dNormActivation(cin, cout, 1)
        layers["b"] = Conv2dNormActivation(cout, cout, 3, stride=stride, groups=groups)
        layers["se"] = SqueezeExcitation(cout, max(1, int(round(se_ratio * cin))))
        layers["c"] = Conv2dNormActivation(cout, cout, 1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float):
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = Conv2dNormActivation(cin, cout, 1, stride=stride, activation_layer=None)
        self.f = BottleneckTransform(cin, cout, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int, depth: int, group_width: int, se_ratio: float,
                 stage_index: int):
        super().__init__()
        for i in range(depth):
            # torchvision's names: "block1-0", not identifiers
            self.add_module(f"block{stage_index}-{i}",
                            ResBottleneckBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, group_width,
                                               se_ratio))


class RegNet(nn.Module):
    def __init__(self, stem: int, widths: list[int], depths: list[int], group_width: int, in_channels: int = 3,
                 num_classes: int = 10, se_ratio: float = 0.25):
        super().__init__()
        self.stem = Conv2dNormActivation(in_channels, stem, 3, stride=2)
        blocks = []
        cin = stem
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks.append((f"block{i + 1}", AnyStage(cin, width, 2, depth, group_width, se_ratio, i + 1)))
            cin = width
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk_output(self.stem(x))
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


# ----------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, sd_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims: list[int], depths: list[int], patch: int, in_channels: int = 3, num_classes: int = 10,
                 stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6):
        super().__init__()
        norm = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, dims[0], patch, patch, norm_layer=norm,
                                                        activation_layer=None)]
        layers[0][0].padding = (0, 0)   # torchvision's stem: kernel = stride = 4, no padding
        total, done = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage = []
            for _ in range(depth):
                stage.append(CNBlock(dim, layer_scale, stochastic_depth_prob * done / max(1, total - 1)))
                done += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# ----------------------------------------------------------------------------- ViT (torchvision)


class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0, approximate: str = "none"):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(approximate=approximate), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, dim), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim)
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(hidden_dim, num_classes))]))

    def _process_input(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h = h // p
        n_w = w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


# ----------------------------------------------------------------------------- ViT (timm)


class TimmAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """timm.layers.drop_path (not torch.fx-wrapped: it traces to nothing in eval)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)   # NCHW -> NLC
        return self.norm(x)


class TimmVisionTransformer(nn.Module):
    """timm's VisionTransformer: forward(x, attn_mask=None), SDPA attention, layer scale, drop path, GELU-tanh."""

    def __init__(self, image_size: int, patch: int, depth: int, num_heads: int, dim: int, in_channels: int = 3,
                 num_classes: int = 10, drop_path_rate: float = 0.1):
        super().__init__()
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(patch, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[TimmBlock(dim, num_heads, 4.0, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        x = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        x = self.forward_features(x, attn_mask=attn_mask)
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------- every activation, one per layer


class ActivationZoo(nn.Module):
    """A small CNN with the element-wise activations no family above uses: LeakyReLU, ELU, Mish, GELU (erf)."""

    def __init__(self, width: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.act2 = nn.ELU()
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(2 * width, 2 * width)
        self.fc2 = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = F.mish(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.gelu(self.fc1(x)))


# ----------------------------------------------------------------------------- the table


def _tiny_or_full(size: str, tiny, full):
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    return tiny if size == "tiny" else full


def resnet18(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    layers, widths = _tiny_or_full(size, ([1, 1], [8, 16]), ([2, 2, 2, 2], [64, 128, 256, 512]))
    return ResNet(BasicBlock, layers, widths, in_channels, classes)


def resnet50(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    layers, widths = _tiny_or_full(size, ([1, 1], [4, 8]), ([3, 4, 6, 3], [64, 128, 256, 512]))
    return ResNet(Bottleneck, layers, widths, in_channels, classes)


def mobilenet_v2(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    setting = _tiny_or_full(size, [[1, 8, 1, 1], [4, 8, 2, 2]],
                            [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                             [6, 160, 3, 2], [6, 320, 1, 1]])
    first, last = _tiny_or_full(size, (8, 32), (32, 1280))
    return MobileNetV2(setting, first, last, in_channels, classes)


def mobilenet_v3(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    # (kernel, expanded, out, SE, hardswish, stride): mobilenet_v3_small's rows
    setting = _tiny_or_full(size, [(3, 8, 8, True, False, 2), (3, 24, 16, False, False, 1),
                                   (5, 32, 16, True, True, 1)],
                            [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                             (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                             (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                             (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)])
    first, last_conv, last = _tiny_or_full(size, (8, 32, 32), (16, 576, 1024))
    return MobileNetV3(setting, first, last_conv, last, in_channels, classes)


def efficientnet(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    # (expand ratio, kernel, stride, out, repeats): efficientnet_b0's rows
    setting = _tiny_or_full(size, [(1, 3, 1, 8, 1), (4, 3, 2, 16, 2)],
                            [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)])
    first, last = _tiny_or_full(size, (8, 32), (32, 1280))
    return EfficientNet(setting, first, last, in_channels, classes)


def shufflenet_v2(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    repeats, channels = _tiny_or_full(size, ([1, 2, 1], [8, 16, 32, 32, 64]),
                                      ([4, 8, 4], [24, 116, 232, 464, 1024]))
    return ShuffleNetV2(repeats, channels, in_channels, classes)


def densenet(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    growth, blocks, init, bn_size = _tiny_or_full(size, (4, (2, 2), 8, 2), (32, (6, 12, 24, 16), 64, 4))
    return DenseNet(growth, blocks, init, bn_size, in_channels, classes)


def squeezenet(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    fires, first, stride = _tiny_or_full(size, ([(8, 4, 8, 8), (16, 4, 8, 8), (16, 8, 16, 16)], 8, 1),
                                 ([(64, 16, 64, 64), (128, 16, 64, 64), (128, 32, 128, 128), (256, 32, 128, 128),
                                   (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256),
                                   (512, 64, 256, 256)], 64, 2))
    return SqueezeNet(fires, first, in_channels, classes, stride)


def regnet(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    stem, widths, depths, group = _tiny_or_full(size, (8, [8, 16], [1, 2], 4),
                                                (32, [48, 104, 208, 440], [1, 3, 6, 6], 8))
    return RegNet(stem, widths, depths, group, in_channels, classes)


def convnext(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    dims, depths, patch = _tiny_or_full(size, ([8, 16], [1, 1], 2), ([96, 192, 384, 768], [3, 3, 9, 3], 4))
    return ConvNeXt(dims, depths, patch, in_channels, classes)


def vit(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    image, patch, layers, heads, dim, mlp = _tiny_or_full(size, (8, 2, 1, 2, 16, 32), (32, 4, 12, 12, 768, 3072))
    return VisionTransformer(image, patch, layers, heads, dim, mlp, in_channels, classes)


def timm_vit(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    image, patch, depth, heads, dim = _tiny_or_full(size, (8, 2, 1, 2, 16), (32, 4, 12, 3, 192))
    return TimmVisionTransformer(image, patch, depth, heads, dim, in_channels, classes)


def activations(in_channels: int = 3, classes: int = 10, size: str = "full") -> nn.Module:
    return ActivationZoo(_tiny_or_full(size, 8, 32), in_channels, classes)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet, "shufflenet_v2": shufflenet_v2, "densenet": densenet, "squeezenet": squeezenet,
    "regnet": regnet, "convnext": convnext, "vit": vit, "timm_vit": timm_vit, "activations": activations,
}


class Composite(nn.Module):
    """Every family at once, as branches whose logits are summed: one graph with every block pattern, for what
    costs one export per model (a test exports this once instead of each family)."""

    def __init__(self, in_channels: int = 1, classes: int = 10, size: str = "tiny"):
        super().__init__()
        self.families = list(FAMILIES)
        for family in self.families:
            self.add_module(family, FAMILIES[family](in_channels, classes, size))

    def forward(self, x: Tensor) -> Tensor:
        logits = getattr(self, self.families[0])(x)
        for family in self.families[1:]:
            logits = logits + getattr(self, family)(x)
        return logits


def composite_tiny() -> nn.Module:
    """``--arch tests.zoo:composite_tiny``: every family's tiny form in one model."""
    torch.manual_seed(0)
    return Composite().eval()


def build(family: str, in_channels: int = 1, classes: int = 10, size: str = "tiny", seed: int = 0) -> nn.Module:
    """An untrained ``family`` in eval mode, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return FAMILIES[family](in_channels, classes, size).eval()


def tiny(family: str) -> Callable[[], nn.Module]:
    """The zero-argument factory ``--arch tests.zoo:<family>_tiny`` calls: 1 channel, 10 classes, 8x8."""
    factory = partial(build, family, 1, 10, "tiny")
    factory.__name__ = f"{family}_tiny"
    return factory


for _family in FAMILIES:
    globals()[f"{_family}_tiny"] = tiny(_family)
