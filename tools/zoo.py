"""A model zoo for testing the trainable form: plain-torch architectures (no torchvision),
an ONNX-native tf2onnx/paddle2onnx-style CNN, and one export function.

Every torch builder returns an ``nn.Module`` in eval mode with a seeded random init in which
nothing is an identity: BatchNorm running statistics and affine parameters, LayerNorm
affine parameters, ConvNeXt layer scales, ViT class token and position embedding are all
random. The architectures follow torchvision's definitions (ResNet v1.5 with the stride on
the 3x3 conv, MobileNetV2/V3, EfficientNet, RegNetY, ConvNeXt, ViT) and Hugging Face's BERT.

Use a registered configuration by name::

    entry = ZOO["resnet_tiny"]
    model = entry.build()                     # nn.Module, eval mode
    inputs = entry.inputs(batch=2, seed=0)    # tuple of example tensors
    export(model, inputs, "m.onnx", dynamo=False, opset=17,
           input_names=entry.input_names, output_names=entry.output_names,
           dynamic_axes=entry.dynamic_axes)

or call the builders directly: ``resnet50()`` is the full standard ResNet-50 (224x224).
``tf_style_cnn(opset)`` returns an ``onnx.ModelProto`` built with onnx.helper.

Opsets each exporter accepts (torch 2.13, onnxscript 0.7, onnx 1.23):

* legacy TorchScript exporter (``dynamo=False``): 7..23; 24+ raise "Unsupported onnx_opset_version".
  nn.MultiheadAttention (the ViT) needs >= 14 (scaled_dot_product_attention). LayerNorm
  is decomposed (ReduceMean/Sub/Pow/Sqrt/Div) below 17; exact GELU is Erf below 20 and
  Gelu from 20; Hardswish is HardSigmoid*x below 14. Eval-mode BatchNorm after a Conv is
  folded into the Conv (``keep_batchnorm=True`` keeps BatchNormalization nodes).
* dynamo exporter (``dynamo=True``): 18..25 as asked. Asked for < 18 it logs a failed
  down-conversion and silently writes opset 18, so :func:`export` refuses < 18 instead.
  Its onnxscript optimizer also folds BatchNorm into Conv and Linear's transposes into the
  weights; ``optimize=False`` leaves BatchNormalization, CastLike/Expand chains and
  MatMul weights behind Transpose nodes.

Command line::

    python tools/zoo.py list
    python tools/zoo.py export resnet50 out.onnx --opset 17 [--dynamo] [--batch 1]
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

LEGACY_OPSETS = range(7, 24)
DYNAMO_OPSETS = range(18, 26)


# ---------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------

def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights as torchvision initialises them, then random norm statistics/affines.

    Conv: kaiming normal (fan_out), as torchvision; Linear: N(0, 1/in_features) so
    activations stay O(1); BatchNorm: weight U(0.5, 1.5), bias N(0, 0.1), running mean
    N(0, 0.1), running var U(0.5, 1.5); LayerNorm: weight U(0.5, 1.5), bias N(0, 0.1);
    Embedding N(0, 1). Modules with a ``reset_random(generator)`` method (ConvNeXt layer
    scales, ViT tokens) randomise themselves afterwards. Activations stay finite and O(1)
    to O(100) (ResNet-50's residual sums grow to ~500 at the logits).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(m, nn.MultiheadAttention):
                if m.in_proj_weight is not None:
                    m.in_proj_weight.normal_(0.0, 1.0 / math.sqrt(m.embed_dim), generator=g)
                if m.in_proj_bias is not None:
                    m.in_proj_bias.normal_(0.0, 0.1, generator=g)
        for m in model.modules():
            if hasattr(m, "reset_random"):
                m.reset_random(g)
    return model.eval()


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's channel rounding (from the original TensorFlow MobileNet code)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: Conv2d (no bias) + BatchNorm2d + activation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: Callable[[], nn.Module] | None = nn.ReLU, dilation: int = 1):
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, 1x1 conv, act, 1x1 conv, scale act, multiply."""

    def __init__(self, channels: int, squeeze: int, activation: Callable[[], nn.Module] = nn.ReLU,
                 scale_activation: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# ---------------------------------------------------------------------------------------
# ResNet (torchvision v1.5)
# ---------------------------------------------------------------------------------------

def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 width: int = 64, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.inplanes = width
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64, seed: int = 0) -> ResNet:
    return _randomise(ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width), seed)


def resnet50(num_classes: int = 1000, width: int = 64, seed: int = 0) -> ResNet:
    """The standard ResNet-50 (25.6M parameters at the defaults)."""
    return _randomise(ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width), seed)


def resnet_tiny(num_classes: int = 10, seed: int = 0) -> ResNet:
    """ResNet-50's Bottleneck architecture, one block per stage, width 8 (for tests)."""
    return _randomise(ResNet(Bottleneck, [1, 1, 1, 1], num_classes, width=8), seed)


# ---------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------

class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
               [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        cin = _make_divisible(32 * width_mult, 8)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), 8)
        features: list[nn.Module] = [ConvNormActivation(3, cin, stride=2, activation=nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(InvertedResidualV2(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormActivation(cin, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, seed: int = 0) -> MobileNetV2:
    return _randomise(MobileNetV2(num_classes, width_mult), seed)


# ---------------------------------------------------------------------------------------
# MobileNetV3-Small
# ---------------------------------------------------------------------------------------

class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, activation: str,
                 stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=act))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3Small(nn.Module):
    # input, kernel, expanded, output, SE, activation, stride
    SETTING = [
        (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
    ]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()

        def adjust(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        layers: list[nn.Module] = [ConvNormActivation(3, adjust(16), 3, 2, activation=nn.Hardswish)]
        for cin, k, exp, cout, se, act, s in self.SETTING:
            layers.append(InvertedResidualV3(adjust(cin), k, adjust(exp), adjust(cout), se, act, s))
        last_in = adjust(96)
        layers.append(ConvNormActivation(last_in, 6 * last_in, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = adjust(1024)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0, seed: int = 0) -> MobileNetV3Small:
    return _randomise(MobileNetV3Small(num_classes, width_mult), seed)


# ---------------------------------------------------------------------------------------
# EfficientNet-B0
# ---------------------------------------------------------------------------------------

class MBConv(nn.Module):
    def __init__(self, expand_ratio: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = _make_divisible(cin * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)  # stochastic depth is the identity in eval mode
        return y + x if self.use_res_connect else y


class EfficientNet(nn.Module):
    # expand, kernel, stride, in, out, layers  (B0)
    SETTING = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0):
        super().__init__()

        def adjust(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        layers: list[nn.Module] = [ConvNormActivation(3, adjust(32), 3, 2, activation=nn.SiLU)]
        for t, k, s, cin, cout, n in self.SETTING:
            stage = []
            for i in range(int(math.ceil(n * depth_mult))):
                stage.append(MBConv(t, k, s if i == 0 else 1, adjust(cin) if i == 0 else adjust(cout), adjust(cout)))
            layers.append(nn.Sequential(*stage))
        last_in = adjust(320)
        layers.append(ConvNormActivation(last_in, 4 * last_in, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(4 * last_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0,
                    seed: int = 0) -> EfficientNet:
    return _randomise(EfficientNet(num_classes, width_mult, depth_mult), seed)


# ---------------------------------------------------------------------------------------
# RegNetY
# ---------------------------------------------------------------------------------------

class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float,
                 bottleneck_multiplier: float = 1.0):
        super().__init__()
        w_b = int(round(width_out * bottleneck_multiplier))
        groups = w_b // group_width
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = ConvNormActivation(width_in, width_out, 1, stride, activation=None)
        layers: list[nn.Module] = [
            ConvNormActivation(width_in, w_b, 1),
            ConvNormActivation(w_b, w_b, 3, stride, groups=groups),
        ]
        if se_ratio:
            layers.append(SqueezeExcitation(w_b, int(round(se_ratio * width_in))))
        layers.append(ConvNormActivation(w_b, width_out, 1, activation=None))
        self.f = nn.Sequential(*layers)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self, widths: Sequence[int], depths: Sequence[int], group_width: int, se_ratio: float,
                 stem_width: int = 32, num_classes: int = 1000):
        super().__init__()
        self.stem = ConvNormActivation(3, stem_width, 3, 2)
        stages = []
        cin = stem_width
        for w, d in zip(widths, depths):
            gw = min(group_width, w)
            stages.append(nn.Sequential(*[ResBottleneckBlock(cin if i == 0 else w, w, 2 if i == 0 else 1, gw, se_ratio)
                                          for i in range(d)]))
            cin = w
        self.trunk_output = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_y_400mf(num_classes: int = 1000, seed: int = 0) -> RegNet:
    """torchvision's regnet_y_400mf (stage widths/depths as its BlockParams resolve them)."""
    return _randomise(RegNet([48, 104, 208, 440], [1, 3, 6, 6], 8, 0.25, 32, num_classes), seed)


def regnet(widths: Sequence[int] = (48, 104, 208, 440), depths: Sequence[int] = (1, 3, 6, 6),
           group_width: int = 8, se_ratio: float = 0.25, stem_width: int = 32, num_classes: int = 1000,
           seed: int = 0) -> RegNet:
    return _randomise(RegNet(widths, depths, group_width, se_ratio, stem_width, num_classes), seed)


# ---------------------------------------------------------------------------------------
# ConvNeXt
# ---------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, by permuting to NHWC and back (torchvision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            _Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def reset_random(self, g: torch.Generator) -> None:
        # torchvision's 1e-6 would make every block nearly the identity: exactness checks
        # would not see the block's operators at all.
        self.layer_scale.uniform_(0.2, 1.0, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x) + x  # stochastic depth: identity in eval


class _Permute(nn.Module):
    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class ConvNeXt(nn.Module):
    def __init__(self, dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (3, 3, 9, 3),
                 num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4, bias=True), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes: int = 1000, dims: Sequence[int] = (96, 192, 384, 768),
                  depths: Sequence[int] = (3, 3, 9, 3), seed: int = 0) -> ConvNeXt:
    return _randomise(ConvNeXt(dims, depths, num_classes), seed)


# ---------------------------------------------------------------------------------------
# BERT (Hugging Face BertModel, eager attention)
# ---------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros((1, max_positions), dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        position_ids = self.position_ids[:, :seq]
        token_type_ids = self.token_type_ids[:, :seq].expand(batch, seq)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        probs = self.dropout(F.softmax(scores + mask, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.heads * self.head_size,))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention_norm(self.dropout(self.attention_output(self.attention(x, mask))) + x)
        h = F.gelu(self.intermediate(a))
        return self.output_norm(self.dropout(self.output(h)) + a)


class Bert(nn.Module):
    """BertModel: outputs (last_hidden_state [B,S,H], pooler_output [B,H])."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12,
                 intermediate: int = 3072, max_positions: int = 512):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_positions)
        self.encoder = nn.ModuleList([BertLayer(hidden, heads, intermediate) for _ in range(layers)])
        self.pooler = nn.Linear(hidden, hidden)
        self.vocab, self.max_positions = vocab, max_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask[:, None, None, :].to(torch.float32)
        mask = (1.0 - mask) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids)
        for layer in self.encoder:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return x, pooled


def bert(vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, intermediate: int = 3072,
         max_positions: int = 512, seed: int = 0) -> Bert:
    return _randomise(Bert(vocab, hidden, layers, heads, intermediate, max_positions), seed)


def bert_tiny(seed: int = 0) -> Bert:
    return bert(vocab=100, hidden=64, layers=2, heads=4, intermediate=128, max_positions=32, seed=seed)


def bert_inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never the padding id 0 where attended) and a mask padding each row's tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    return ids * mask, mask


# ---------------------------------------------------------------------------------------
# Vision Transformer (torchvision)
# ---------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, hidden), nn.Dropout(0.0))

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x_in)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + x_in
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 224, patch_size: int = 16, layers: int = 12, heads: int = 12,
                 hidden: int = 768, mlp_dim: int = 3072, num_classes: int = 1000):
        super().__init__()
        self.patch_size, self.hidden = patch_size, hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch_size, patch_size)
        seq = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden))
        self.layers = nn.Sequential(*[EncoderBlock(heads, hidden, mlp_dim) for _ in range(layers)])
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, num_classes)

    def reset_random(self, g: torch.Generator) -> None:
        self.class_token.normal_(0.0, 0.5, generator=g)
        self.pos_embedding.normal_(0.0, 0.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden, (h // self.patch_size) * (w // self.patch_size)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.head(x[:, 0])


def vit(image_size: int = 224, patch_size: int = 16, layers: int = 12, heads: int = 12, hidden: int = 768,
        mlp_dim: int = 3072, num_classes: int = 1000, seed: int = 0) -> VisionTransformer:
    return _randomise(VisionTransformer(image_size, patch_size, layers, heads, hidden, mlp_dim, num_classes), seed)


# ---------------------------------------------------------------------------------------
# The torch models' prunable weights, as an exporter may store them
# ---------------------------------------------------------------------------------------

@dataclass
class TorchWeight:
    """A Conv/Linear weight of a torch model and the forms an exporter may write it in."""

    name: str
    forms: dict[str, np.ndarray]  # "raw", "transposed" (Linear as MatMul), "bn_folded" (Conv+BN)


def prunable_torch_weights(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[TorchWeight]:
    """Every Conv/Linear weight (and MultiheadAttention's packed in-projection), once each.

    Exporters may write a Linear weight transposed for MatMul, and the legacy exporter
    folds an eval-mode BatchNorm that directly follows a Conv into the Conv's weight; each
    weight lists those forms, found by running ``example_inputs`` with hooks.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    weights: dict[int, TorchWeight] = {}
    convs: dict[int, nn.Conv2d] = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            w = m.weight
            if id(w) in weights:
                continue
            forms = {"raw": w.detach().numpy().copy()}
            if isinstance(m, nn.Linear):
                forms["transposed"] = forms["raw"].T.copy()
            weights[id(w)] = TorchWeight(names[id(w)], forms)
            if isinstance(m, nn.Conv2d):
                convs[id(m)] = m
        elif isinstance(m, nn.MultiheadAttention):
            packed = [m.in_proj_weight] if m.in_proj_weight is not None else [m.q_proj_weight, m.k_proj_weight,
                                                                               m.v_proj_weight]
            for w in packed:
                raw = w.detach().numpy().copy()
                weights.setdefault(id(w), TorchWeight(names[id(w)], {"raw": raw, "transposed": raw.T.copy()}))

    # Conv -> BatchNorm pairs: a BN whose input is exactly a conv's output tensor.
    outputs: dict[int, nn.Conv2d] = {}
    keep: list[torch.Tensor] = []
    pairs: dict[int, nn.BatchNorm2d] = {}
    handles = []

    def conv_hook(module, args, output):
        outputs[id(output)] = module
        keep.append(output)

    def bn_hook(module, args):
        conv = outputs.get(id(args[0]))
        if conv is not None:
            pairs[id(conv)] = module

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    for cid, bn in pairs.items():
        conv = convs[cid]
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        folded = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
        weights[id(conv.weight)].forms["bn_folded"] = folded.numpy()
    return list(weights.values())


# ---------------------------------------------------------------------------------------
# A tf2onnx / paddle2onnx-flavoured CNN, written with onnx.helper
# ---------------------------------------------------------------------------------------

@dataclass
class OnnxZooModel:
    model: onnx.ModelProto
    weights: list[np.ndarray]  # the distinct prunable weights, as stored


def tf_style_cnn(opset: int = 13, seed: int = 0, image: int = 32, channels: int = 16,
                 num_classes: int = 10) -> OnnxZooModel:
    """What converter output looks like: NHWC input transposed to NCHW, weights in Constant
    nodes (one behind an Identity, one shared by two Convs), BatchNormalization unfolded into
    Mul/Add, ReLU6 as Clip with min/max inputs, HardSigmoid, HardSwish (x * HardSigmoid(x)
    before opset 14), Pad (constant and reflect) before a VALID conv, ReduceMean squeeze-
    excitation, Resize nearest (scales, asymmetric/floor) and linear (sizes, half_pixel; and
    align_corners), NHWC feature output and a MatMul + Add classifier.

    Inputs ``input:0`` [N, image, image, 3]; outputs ``features:0`` [N, image/2, image/2, C]
    and ``logits:0`` [N, num_classes]. Valid for opsets 13..21 (and later).
    """
    rng = np.random.default_rng(seed)
    c = channels
    nodes: list[onnx.NodeProto] = []
    weights: list[np.ndarray] = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}__{counter[0]}"

    def const(array: np.ndarray, prefix: str = "const") -> str:
        out = name(prefix)
        nodes.append(helper.make_node("Constant", [], [out], name=out + "_node",
                                      value=numpy_helper.from_array(np.asarray(array), out)))
        return out

    def weight(shape: tuple[int, ...], fan_in: int) -> str:
        w = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
        weights.append(w)
        return const(w, "weight")

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def batchnorm(x: str, ch: int) -> str:
        gamma = rng.uniform(0.5, 1.5, ch)
        beta = rng.normal(0, 0.1, ch)
        mean = rng.normal(0, 0.1, ch)
        var = rng.uniform(0.5, 1.5, ch)
        scale = gamma / np.sqrt(var + 1e-3)
        shift = beta - mean * scale
        x = node("Mul", [x, const(scale.astype(np.float32).reshape(1, ch, 1, 1))])
        return node("Add", [x, const(shift.astype(np.float32).reshape(1, ch, 1, 1))])

    def relu6(x: str) -> str:
        return node("Clip", [x, const(np.array(0.0, np.float32)), const(np.array(6.0, np.float32))])

    def hardswish(x: str) -> str:
        if opset >= 14:
            return node("HardSwish", [x])
        return node("Mul", [x, node("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)])

    def reduce_mean(x: str, axes: list[int]) -> str:
        if opset >= 18:
            return node("ReduceMean", [x, const(np.array(axes, np.int64))], keepdims=1)
        return node("ReduceMean", [x], axes=axes, keepdims=1)

    x = node("Transpose", ["input:0"], perm=[0, 3, 1, 2])
    # Stem: Conv 3x3 s2 SAME (explicit pads), BN as Mul/Add, ReLU6.
    stem = relu6(batchnorm(node("Conv", [x, weight((c, 3, 3, 3), 27)], kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]), c))
    # Depthwise 3x3 with bias, BN, HardSwish.
    dw_w = weight((c, 1, 3, 3), 9)
    y = node("Conv", [stem, dw_w, const(rng.normal(0, 0.1, c).astype(np.float32))], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1], group=c)
    y = hardswish(batchnorm(y, c))
    # paddle-style explicit Pad then a VALID conv (weight behind an Identity), stride 2.
    pads = const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    y = node("Pad", [y, pads, const(np.array(0.0, np.float32))], mode="constant")
    w_id = node("Identity", [weight((2 * c, c, 3, 3), 9 * c)])
    down = relu6(batchnorm(node("Conv", [y, w_id], kernel_shape=[3, 3], strides=[2, 2]), 2 * c))
    # Reflect pad + 3x3 VALID conv.
    y = node("Pad", [down, const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
    y = relu6(batchnorm(node("Conv", [y, weight((2 * c, 2 * c, 3, 3), 18 * c)], kernel_shape=[3, 3]), 2 * c))
    # Squeeze-excitation with ReduceMean, Conv 1x1 with bias, Relu, HardSigmoid (keras defaults).
    s = reduce_mean(y, [2, 3])
    s = node("Relu", [node("Conv", [s, weight((c // 2, 2 * c, 1, 1), 2 * c), const(np.zeros(c // 2, np.float32))],
                           kernel_shape=[1, 1])])
    s = node("Conv", [s, weight((2 * c, c // 2, 1, 1), c // 2), const(rng.normal(0, 0.1, 2 * c).astype(np.float32))],
             kernel_shape=[1, 1])
    y = node("Mul", [y, node("HardSigmoid", [s], alpha=0.2, beta=0.5)])
    # Upsample back: Resize nearest (scales, asymmetric / floor), add the skip.
    up = node("Resize", [y, "", const(np.array([1, 1, 2, 2], np.float32))], mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    # A 1x1 lateral conv whose weight is shared by two Convs.
    lateral = weight((2 * c, c, 1, 1), c)
    skip = node("Conv", [stem, lateral], kernel_shape=[1, 1])
    y = node("Add", [up, skip])
    # Resize linear with sizes (half_pixel), back to the skip size after a stride-2 detour;
    # the sizes come from Shape/Slice/Concat so the batch stays dynamic.
    half = image // 2
    batch_dim = node("Slice", [node("Shape", [stem]), const(np.array([0], np.int64)), const(np.array([1], np.int64))])
    sizes = node("Concat", [batch_dim, const(np.array([2 * c, half, half], np.int64))], axis=0)
    y2 = node("Resize", [node("Conv", [stem, lateral], kernel_shape=[1, 1], strides=[2, 2]), "", "", sizes],
              mode="linear", coordinate_transformation_mode="half_pixel")
    y = node("Add", [y, y2])
    y3 = node("Resize", [node("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2]), "",
                         const(np.array([1, 1, 2, 2], np.float32))],
              mode="linear", coordinate_transformation_mode="align_corners")
    y = node("Add", [y, y3])
    features = hardswish(batchnorm(node("Conv", [y, weight((c, 2 * c, 1, 1), 2 * c)], kernel_shape=[1, 1]), c))
    nodes.append(helper.make_node("Transpose", [features], ["features:0"], name="features_nhwc", perm=[0, 2, 3, 1]))
    pooled = reduce_mean("features:0", [1, 2])
    flat = node("Reshape", [pooled, const(np.array([-1, c], np.int64))])
    logits = node("MatMul", [flat, weight((c, num_classes), c)])
    nodes.append(helper.make_node("Add", [logits, const(rng.normal(0, 0.1, num_classes).astype(np.float32))],
                                  ["logits:0"], name="logits_add"))

    nodes = _toposort(nodes)

    graph = helper.make_graph(
        nodes, "tf_style_cnn",
        [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, ["unk__0", image, image, 3])],
        [helper.make_tensor_value_info("features:0", TensorProto.FLOAT, ["unk__0", half, half, c]),
         helper.make_tensor_value_info("logits:0", TensorProto.FLOAT, ["unk__0", num_classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return OnnxZooModel(model, weights)


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    produced = {o for n in nodes for o in n.output}
    done: set[str] = set()
    ordered, pending = [], list(nodes)
    while pending:
        progress = False
        for n in list(pending):
            if all(not i or i not in produced or i in done for i in n.input):
                ordered.append(n)
                done.update(n.output)
                pending.remove(n)
                progress = True
        if not progress:
            raise ValueError("cycle in graph")
    return ordered


# ---------------------------------------------------------------------------------------
# Registry of configurations
# ---------------------------------------------------------------------------------------

def _images(size: int) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
    def make(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, size, size, generator=g),)
    return make


@dataclass
class ZooEntry:
    """A named configuration: how to build it and feed it."""

    build: Callable[[], nn.Module]
    inputs: Callable[..., tuple[torch.Tensor, ...]]  # inputs(batch=2, seed=0)
    input_names: list[str] = field(default_factory=lambda: ["input"])
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    dynamic_axes: dict[str, dict[int, str]] | None = None
    description: str = ""

    def __post_init__(self):
        if self.dynamic_axes is None:
            self.dynamic_axes = {n: {0: "batch"} for n in (*self.input_names, *self.output_names)}


def _bert_entry(factory: Callable[[], Bert], seq: int, vocab: int, description: str) -> ZooEntry:
    def inputs(batch: int = 2, seed: int = 0, seq_len: int = seq) -> tuple[torch.Tensor, ...]:
        return bert_inputs(batch, seq_len, vocab, seed)
    return ZooEntry(factory, inputs, ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"],
                    {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                     "last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}},
                    description)


ZOO: dict[str, ZooEntry] = {
    # Full-size standard architectures.
    "resnet18": ZooEntry(resnet18, _images(224), description="ResNet-18, 224x224"),
    "resnet50": ZooEntry(resnet50, _images(224), description="ResNet-50, 224x224"),
    "mobilenet_v2": ZooEntry(mobilenet_v2, _images(224), description="MobileNetV2 1.0, 224x224"),
    "mobilenet_v3_small": ZooEntry(mobilenet_v3_small, _images(224), description="MobileNetV3-Small 1.0, 224x224"),
    "efficientnet_b0": ZooEntry(efficientnet_b0, _images(224), description="EfficientNet-B0, 224x224"),
    "regnet_y_400mf": ZooEntry(regnet_y_400mf, _images(224), description="RegNetY-400MF, 224x224"),
    "convnext_tiny": ZooEntry(convnext_tiny, _images(224), description="ConvNeXt-T, 224x224"),
    "bert_base": _bert_entry(bert, 128, 30522, "BERT-base, sequence 128"),
    "vit_b_16": ZooEntry(vit, _images(224), description="ViT-B/16, 224x224"),
    # Small configurations for tests: same blocks, fewer channels/blocks, small inputs.
    "resnet_tiny": ZooEntry(resnet_tiny, _images(64), description="Bottleneck ResNet, 1 block/stage, width 8, 64x64"),
    "resnet18_small": ZooEntry(lambda: resnet18(num_classes=10, width=16), _images(64),
                               description="ResNet-18 at width 16, 64x64"),
    "mobilenet_v2_small": ZooEntry(lambda: mobilenet_v2(num_classes=10, width_mult=0.35), _images(64),
                                   description="MobileNetV2 0.35, 64x64"),
    "mobilenet_v3_small_small": ZooEntry(lambda: mobilenet_v3_small(num_classes=10, width_mult=0.5), _images(64),
                                         description="MobileNetV3-Small 0.5, 64x64"),
    "efficientnet_small": ZooEntry(lambda: efficientnet_b0(num_classes=10, width_mult=0.25, depth_mult=0.34),
                                   _images(64), description="EfficientNet-B0 width 0.25, depth 0.34 (1-2 blocks/stage), 64x64"),
    "regnet_small": ZooEntry(lambda: regnet((16, 32, 64), (1, 2, 1), 8, 0.25, 16, 10), _images(64),
                             description="RegNetY, widths 16/32/64, group width 8, SE, 64x64"),
    "convnext_small": ZooEntry(lambda: convnext_tiny(10, (16, 32, 48, 64), (1, 1, 2, 1)), _images(64),
                               description="ConvNeXt, dims 16/32/48/64, depths 1/1/2/1, 64x64"),
    "bert_tiny": _bert_entry(bert_tiny, 16, 100, "BERT, 2 layers, hidden 64, 4 heads, sequence 16"),
    "vit_tiny": ZooEntry(lambda: vit(32, 8, 2, 4, 64, 128, 10), _images(32),
                         description="ViT, 32x32 image, patch 8, 2 layers, hidden 64, 4 heads"),
}

# ONNX-native models (not exported from torch): name -> builder(opset) -> OnnxZooModel.
ONNX_ZOO: dict[str, Callable[[int], OnnxZooModel]] = {"tf_style_cnn": tf_style_cnn}


def tf_style_inputs(batch: int = 2, seed: int = 0, image: int = 32) -> dict[str, np.ndarray]:
    return {"input:0": np.random.default_rng(seed).standard_normal((batch, image, image, 3)).astype(np.float32)}


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Silence exporter warnings, progress prints and logging (torchvision-missing notes...)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                              "onnxscript", "torch._export", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, path: str | Path, *,
           dynamo: bool, opset: int, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None,
           dynamic_axes: dict[str, dict[int, str]] | None = None, keep_batchnorm: bool = False,
           optimize: bool = True) -> Path:
    """torch.onnx.export, legacy (``dynamo=False``) or dynamo, quietly; one self-contained file.

    ``dynamic_axes`` ({input or output name: {axis: dim name}}) makes those axes dynamic; for
    the dynamo exporter the input axes become ``torch.export.Dim``s (one per dim name,
    shared between inputs) and the output axes follow. Raises ValueError for an opset the
    exporter cannot write (see the module docstring) and when the file's opset differs.

    Both exporters fold an eval-mode BatchNorm that follows a Conv into the Conv by default.
    ``keep_batchnorm`` (legacy) exports with ``training=TrainingMode.PRESERVE``, which keeps
    BatchNormalization nodes; ``optimize=False`` (dynamo) skips the onnxscript optimizer,
    which leaves BatchNormalization, CastLike/Expand chains and weights behind Transpose nodes.
    """
    path = Path(path)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    allowed = DYNAMO_OPSETS if dynamo else LEGACY_OPSETS
    if opset not in allowed:
        raise ValueError(f"the {'dynamo' if dynamo else 'legacy'} exporter writes opsets "
                         f"{allowed.start}..{allowed.stop - 1}, not {opset}")
    input_names = list(input_names) if input_names else [f"input_{i}" for i in range(len(args))]
    model = model.eval()
    with _quiet():
        if dynamo:
            dynamic_shapes = None
            if dynamic_axes:
                dims: dict[str, torch.export.Dim] = {}
                dynamic_shapes = []
                for name, arg in zip(input_names, args):
                    axes = dynamic_axes.get(name, {})
                    spec = {}
                    for axis, dim_name in axes.items():
                        if dim_name not in dims:
                            dims[dim_name] = torch.export.Dim(dim_name, min=1, max=arg.shape[axis] * 1024)
                        spec[axis] = dims[dim_name]
                    dynamic_shapes.append(spec or None)
                dynamic_shapes = tuple(dynamic_shapes)
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=list(output_names) if output_names else None,
                                        dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                                        report=False, optimize=optimize)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=list(output_names) if output_names else None,
                              dynamic_axes=dynamic_axes, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL)
    written = onnx.load(str(path), load_external_data=False)
    got = {o.domain or "": o.version for o in written.opset_import}.get("", None)
    if got != opset:
        raise ValueError(f"asked the {'dynamo' if dynamo else 'legacy'} exporter for opset {opset}, it wrote {got}")
    return path


def export_entry(name: str, path: str | Path, *, dynamo: bool, opset: int, batch: int = 2, seed: int = 0,
                 dynamic: bool = True, **options) -> Path:
    """Build ZOO[name] and export it with its example input, names and dynamic axes."""
    entry = ZOO[name]
    return export(entry.build(), entry.inputs(batch=batch, seed=seed), path, dynamo=dynamo, opset=opset,
                  input_names=entry.input_names, output_names=entry.output_names,
                  dynamic_axes=entry.dynamic_axes if dynamic else None, **options)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    p = sub.add_parser("export")
    p.add_argument("name", choices=[*ZOO, *ONNX_ZOO])
    p.add_argument("out")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamo", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--static", action="store_true", help="no dynamic batch axis")
    ns = parser.parse_args(argv)
    if ns.command == "list":
        for name, entry in ZOO.items():
            print(f"{name:28s} {entry.description}")
        for name in ONNX_ZOO:
            print(f"{name:28s} onnx.helper graph (tf2onnx/paddle2onnx style), any opset 13..21")
        return 0
    if ns.name in ONNX_ZOO:
        onnx.save(ONNX_ZOO[ns.name](ns.opset).model, ns.out)
    else:
        export_entry(ns.name, ns.out, dynamo=ns.dynamo, opset=ns.opset, batch=ns.batch, dynamic=not ns.static)
    print(ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
