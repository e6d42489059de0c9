"""Architectures written the way public model zoos write them, at small widths, for tiling tests.

Each builder mirrors a zoo's coding style rather than its exact sizes: torchvision's ResNets with a
fixed ``AvgPool2d(7)`` (older releases and many ports), MobileNetV2/V3 (``SqueezeExcitation`` with
``Hardsigmoid``), timm's EfficientNet (``x.mean((2, 3), keepdim=True)`` and SiLU), DenseNet's concat,
ShuffleNetV2's ``view/transpose/view`` shuffle and ``chunk``, GhostNet's cheap operations, a
DeepLabV3 ASPP head with image pooling, an hourglass pose net, a GCNet context block, and a model
``torch.fx`` cannot trace. Widths and class counts are small so the tests run in seconds; the
structure (what fusion must get through) is the zoos'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
        ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --- ResNets with a fixed final pool ---------------------------------------------------------------


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, s: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, s, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if s == 1 and cin == c else nn.Sequential(
            nn.Conv2d(cin, c, 1, s, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, s: int) -> None:
        super().__init__()
        out = c * 4
        self.body = nn.Sequential(cbr(cin, c, 1), cbr(c, c, 3, s), cbr(c, out, 1, act=None))
        self.downsample = None if s == 1 and cin == out else nn.Sequential(
            nn.Conv2d(cin, out, 1, s, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class ResNetFixedPool(nn.Module):
    """torchvision's ResNet as older releases wrote it: ``nn.AvgPool2d(7, stride=1)`` before the fc."""

    def __init__(self, block: Any, blocks: tuple[int, ...], widths: tuple[int, ...], pool: int = 7,
                 classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0])
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin, stages = widths[0], []
        for i, (n, c) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AvgPool2d(pool, stride=1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


# --- MobileNets, EfficientNet ----------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, t: int) -> None:
        super().__init__()
        hid = cin * t
        layers: list[nn.Module] = [] if t == 1 else [cbr(cin, hid, 1, act=nn.ReLU6)]
        layers += [cbr(hid, hid, 3, s, hid, nn.ReLU6), cbr(hid, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = s == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 1, 1), (6, 48, 2, 2))
        feats: list[nn.Module] = [cbr(3, 16, 3, 2, act=nn.ReLU6)]
        cin = 16
        for t, c, n, s in cfg:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(cbr(cin, 128, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pool, fc1, act, fc2, scale activation, multiply."""

    def __init__(self, c: int, squeeze: int, scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class V3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: type[nn.Module], s: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [] if exp == cin else [cbr(cin, exp, 1, act=act)]
        layers.append(cbr(exp, exp, k, s, exp, act))
        if se:
            layers.append(SqueezeExcitation(exp, max(8, exp // 4), nn.Hardsigmoid))
        layers.append(cbr(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = s == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + x if self.use_res else y


class MobileNetV3Small(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        cfg = ((16, 3, 16, 16, True, re, 2), (16, 3, 72, 24, False, re, 2), (24, 3, 88, 24, False, re, 1),
               (24, 5, 96, 40, True, hs, 2), (40, 5, 240, 40, True, hs, 1), (40, 5, 120, 48, True, hs, 1),
               (48, 5, 288, 96, True, hs, 2), (96, 5, 576, 96, True, hs, 1))
        layers: list[nn.Module] = [cbr(3, 16, 3, 2, act=hs)]
        layers += [V3Block(*c) for c in cfg]
        layers.append(cbr(96, 576, 1, act=hs))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SqueezeExciteTimm(nn.Module):
    """timm's ``SqueezeExcite``: ``x.mean((2, 3), keepdim=True)``, reduce conv, SiLU, expand conv, gate."""

    def __init__(self, c: int, rd: int) -> None:
        super().__init__()
        self.conv_reduce, self.act1, self.conv_expand = nn.Conv2d(c, rd, 1), nn.SiLU(), nn.Conv2d(rd, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * x_se.sigmoid()


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, e: int) -> None:
        super().__init__()
        mid = cin * e
        self.conv_pw = cbr(cin, mid, 1, act=nn.SiLU) if e != 1 else nn.Identity()
        self.conv_dw = cbr(mid, mid, k, s, mid, nn.SiLU)
        self.se = SqueezeExciteTimm(mid, max(1, cin // 4))
        self.conv_pwl = cbr(mid, cout, 1, act=None)
        self.has_skip = s == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + shortcut if self.has_skip else x


class EfficientNetB0(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = ((1, 8, 1, 1, 3), (6, 12, 2, 2, 3), (6, 16, 2, 2, 5), (6, 24, 2, 2, 3), (6, 32, 1, 1, 5),
               (6, 48, 2, 2, 5), (6, 64, 1, 1, 3))
        blocks: list[nn.Module] = []
        cin = 16
        for e, c, n, s, k in cfg:
            for i in range(n):
                blocks.append(MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        self.conv_stem, self.blocks = cbr(3, 16, 3, 2, act=nn.SiLU), nn.Sequential(*blocks)
        self.conv_head = cbr(cin, 160, 1, act=nn.SiLU)
        self.classifier = nn.Linear(160, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_head(self.blocks(self.conv_stem(x)))
        return self.classifier(x.mean((2, 3)))


# --- DenseNet, ShuffleNetV2, GhostNet --------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1, self.conv1 = nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, blocks: tuple[int, ...] = (3, 4, 4), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        c = 16
        self.blocks, self.trans = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(DenseLayer(c + j * growth, growth) for j in range(n)))
            c += n * growth
            if i < len(blocks) - 1:
                self.trans.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm5, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            feats = [x]
            for layer in block:
                feats.append(layer(feats))
            x = torch.cat(feats, 1)
            if i < len(self.trans):
                x = self.trans[i](x)
        x = F.adaptive_avg_pool2d(F.relu(self.norm5(x)), (1, 1))
        return self.fc(torch.flatten(x, 1))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, s: int) -> None:
        super().__init__()
        self.stride = s
        b = cout // 2
        if s > 1:
            self.branch1 = nn.Sequential(cbr(cin, cin, 3, s, cin, None), cbr(cin, b, 1))
        self.branch2 = nn.Sequential(cbr(cin if s > 1 else b, b, 1), cbr(b, b, 3, s, b, None), cbr(b, b, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.maxpool = cbr(3, 12, 3, 2), nn.MaxPool2d(3, 2, 1)
        units: list[nn.Module] = []
        cin = 12
        for c, n in ((24, 3), (48, 4), (96, 2)):
            for i in range(n):
                units.append(ShuffleUnit(cin, c, 2 if i == 0 else 1))
                cin = c
        self.stages, self.conv5 = nn.Sequential(*units), cbr(cin, 192, 1)
        self.fc = nn.Linear(192, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


def hard_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3.0) / 6.0


class GhostSE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce, self.act1 = nn.Conv2d(c, max(4, c // 4), 1), nn.ReLU()
        self.conv_expand = nn.Conv2d(max(4, c // 4), c, 1)

    def forward(self, x: Tensor) -> Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * hard_sigmoid(x_se)


class GhostModule(nn.Module):
    def __init__(self, cin: int, oup: int, relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init = (oup + 1) // 2
        act = nn.ReLU if relu else None
        self.primary_conv = cbr(cin, init, 1, act=act)
        self.cheap_operation = cbr(init, init, 3, 1, init, act)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, s: int, se: bool) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.conv_dw = cbr(mid, mid, 3, s, mid, None) if s > 1 else None
        self.se = GhostSE(mid) if se else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.shortcut = nn.Sequential() if s == 1 and cin == cout else nn.Sequential(
            cbr(cin, cin, 3, s, cin, None), cbr(cin, cout, 1, act=None))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.conv_dw(y)
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = ((16, 16, 16, 1, False), (16, 48, 24, 2, False), (24, 72, 24, 1, False), (24, 72, 40, 2, True),
               (40, 120, 40, 1, True), (40, 240, 80, 2, False), (80, 200, 80, 1, True))
        self.conv_stem = cbr(3, 16, 3, 2)
        self.blocks = nn.Sequential(*(GhostBottleneck(*c) for c in cfg), cbr(80, 240, 1))
        self.conv_head, self.classifier = nn.Conv2d(240, 320, 1), nn.Linear(320, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.conv_stem(x))
        x = F.relu(self.conv_head(F.adaptive_avg_pool2d(x, 1)))
        return self.classifier(x.flatten(1))


# --- dense prediction: ASPP segmentation head, hourglass pose net, GC block ----------------------


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, ...], cout: int = 32) -> None:
        super().__init__()
        mods: list[nn.Module] = [cbr(cin, cout, 1)]
        for r in rates:
            mods.append(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False),
                                      nn.BatchNorm2d(cout), nn.ReLU()))
        mods.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(mods)
        self.project = nn.Sequential(nn.Conv2d(len(mods) * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabV3(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 16, 3, 2), cbr(16, 24, 3, 2), cbr(24, 32, 3), cbr(32, 48, 3, 2),
                                      cbr(48, 48, 3))
        self.head = nn.Sequential(ASPP(48, (2, 4, 6)), cbr(32, 32, 3), nn.Conv2d(32, classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        out = self.head(self.backbone(x))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class Hourglass(nn.Module):
    def __init__(self, depth: int, c: int) -> None:
        super().__init__()
        self.up1, self.low1 = cbr(c, c), cbr(c, c)
        self.low2 = Hourglass(depth - 1, c) if depth > 1 else cbr(c, c)
        self.low3 = cbr(c, c)

    def forward(self, x: Tensor) -> Tensor:
        up1 = self.up1(x)
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2, stride=2))))
        return up1 + F.interpolate(low, scale_factor=2, mode="nearest")


class PoseHourglass(nn.Module):
    def __init__(self, joints: int = 8) -> None:
        super().__init__()
        self.pre = nn.Sequential(cbr(3, 16, 7, 2), cbr(16, 24), nn.MaxPool2d(2, 2), cbr(24, 24))
        self.hg = nn.Sequential(Hourglass(3, 24), cbr(24, 24, 1))
        self.heatmaps = nn.Conv2d(24, joints, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.refine = nn.Conv2d(joints, joints, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.refine(self.up(self.heatmaps(self.hg(self.pre(x)))))


class ContextBlock(nn.Module):
    """GCNet's context block with average pooling and channel-add fusion."""

    def __init__(self, c: int, ratio: float = 0.25) -> None:
        super().__init__()
        planes = int(c * ratio)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channel_add_conv = nn.Sequential(nn.Conv2d(c, planes, 1), nn.LayerNorm([planes, 1, 1]),
                                              nn.ReLU(inplace=True), nn.Conv2d(planes, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        context = self.avg_pool(x)
        return x + self.channel_add_conv(context)


class GCResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 3, 2), nn.MaxPool2d(2))
        self.body = nn.Sequential(Basic(16, 16, 1), ContextBlock(16), Basic(16, 32, 2), ContextBlock(32),
                                  Basic(32, 32, 1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(self.stem(x))
        return self.fc(torch.amax(x, dim=(2, 3)))


# --- a model torch.fx cannot trace -----------------------------------------------------------------


class SplitLoopNet(nn.Module):
    """Iterates over a split of a traced tensor and sizes a loop by a traced size: fx fails on both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.branches = nn.ModuleList(cbr(4, 4, 3, 1, 4) for _ in range(4))
        self.se = SqueezeExciteTimm(16, 4)
        self.mix = nn.ModuleList(cbr(16, 16, 3) for _ in range(2))
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stem(x)
        parts = [branch(t) for branch, t in zip(self.branches, torch.split(y, 4, dim=1))]
        y = channel_shuffle(torch.cat(parts, 1), 4)
        for i in range(y.shape[1] // 8):
            y = self.mix[i](y)
        return self.head(self.se(y))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and batch-norm statistics (so folding and normalisation are exercised), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


# name -> (builder, input side); fixed-pool ResNets need 224 (AvgPool2d(7) on the 7x7 map) or a pool
# sized for the input
ARCHS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18-fixedpool": (lambda: ResNetFixedPool(Basic, (2, 2, 2, 2), (8, 16, 32, 64)), 224),
    "resnet50-fixedpool": (lambda: ResNetFixedPool(Bottleneck, (1, 2, 2, 1), (4, 8, 16, 32), pool=3), 96),
    "mobilenetv2": (MobileNetV2, 96),
    "mobilenetv3-small": (MobileNetV3Small, 96),
    "efficientnet-b0": (EfficientNetB0, 96),
    "densenet": (DenseNet, 64),
    "shufflenetv2": (ShuffleNetV2, 96),
    "ghostnet": (GhostNet, 64),
    "deeplabv3-aspp": (DeepLabV3, 64),
    "hourglass-pose": (PoseHourglass, 64),
    "gc-resnet": (GCResNet, 64),
    "split-loop-export": (SplitLoopNet, 48),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Tensor]:
    factory, side = ARCHS[name]
    torch.manual_seed(seed)
    model = seeded(factory(), seed)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
