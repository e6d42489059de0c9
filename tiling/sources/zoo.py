"""A small zoo of CNNs built in code with seeded random weights: workloads for partitioning experiments.

Nothing is downloaded: weights are random, reproducible from ``seed`` and calibrated so activations are
O(1) (see :func:`tiling.sources.darknet_layers.seeded_init_`), which is all that tiling correctness and timing
experiments need.  The YOLOv2 entries are generated as Darknet cfg text and go through
:func:`tiling.sources.darknet.load_darknet`, so they exercise exactly the importer that real cfgs use.

Weights depend only on ``(name, seed)``, not on ``input_size``: each entry calibrates at a fixed size.
That lets a test run a model at a small size and trust the conclusion for the full-size one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .darknet import load_darknet
from .darknet_layers import build_uninitialised, seeded_init_

__all__ = ["UnknownModel", "ZooModel", "example", "get", "names"]


@dataclass(frozen=True)
class ZooModel:
    """A built zoo entry; ``input_shape`` is (C, H, W) of the size it was built for."""

    name: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    description: str
    source: str


class UnknownModel(KeyError):
    """A zoo name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------------
# YOLOv2 as Darknet cfg text
# --------------------------------------------------------------------------------------------------

# Compact YOLOv2 (608, COCO) layer list.  ("conv", filters, size) is batch-normalised leaky, stride 1,
# pad=1; ("max",) is 2x2/2; the tail is the passthrough (route, 1x1 conv 64, reorg, route) and the head.
_YOLOV2_LAYERS: tuple[tuple[str | int, ...], ...] = (
    ("conv", 32, 3), ("max",),
    ("conv", 64, 3), ("max",),
    ("conv", 128, 3), ("conv", 64, 1), ("conv", 128, 3), ("max",),
    ("conv", 256, 3), ("conv", 128, 1), ("conv", 256, 3), ("max",),
    ("conv", 512, 3), ("conv", 256, 1), ("conv", 512, 3), ("conv", 256, 1), ("conv", 512, 3), ("max",),
    ("conv", 1024, 3), ("conv", 512, 1), ("conv", 1024, 3), ("conv", 512, 1), ("conv", 1024, 3),
    ("conv", 1024, 3), ("conv", 1024, 3),
    ("route", "-9"), ("conv", 64, 1), ("reorg", 2), ("route", "-1,-4"),
    ("conv", 1024, 3),
    ("head",),
)
_YOLOV2_ANCHORS = "0.57273,0.677385,1.87446,2.06253,3.33843,5.47434,7.88282,3.52778,9.77052,9.16828"
_YOLOV2_CLASSES = 80
_YOLOV2_NUM = 5


def yolov2_cfg(height: int = 608, width: int = 608, *, layers: int | None = None) -> str:
    """Darknet cfg text of YOLOv2 (COCO, 5 anchors), or of its first ``layers`` layers."""
    spec = _YOLOV2_LAYERS if layers is None else _YOLOV2_LAYERS[:layers]
    out = ["[net]", "batch=1", f"width={width}", f"height={height}", "channels=3", ""]
    for item in spec:
        kind = item[0]
        if kind == "conv":
            out += ["[convolutional]", "batch_normalize=1", f"filters={item[1]}", f"size={item[2]}",
                    "stride=1", "pad=1", "activation=leaky"]
        elif kind == "max":
            out += ["[maxpool]", "size=2", "stride=2"]
        elif kind == "route":
            out += ["[route]", f"layers={item[1]}"]
        elif kind == "reorg":
            out += ["[reorg]", f"stride={item[1]}"]
        elif kind == "head":
            filters = _YOLOV2_NUM * (_YOLOV2_CLASSES + 5)
            out += ["[convolutional]", f"filters={filters}", "size=1", "stride=1", "pad=1", "activation=linear", ""]
            out += ["[region]", f"anchors={_YOLOV2_ANCHORS}", f"classes={_YOLOV2_CLASSES}", "coords=4",
                    f"num={_YOLOV2_NUM}", "softmax=1"]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------------

_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                     512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 (configuration D): 13 biased 3x3 convs with ReLU, 5 max pools, 3 fully connected layers."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        # Adaptive pooling keeps the classifier's 512*7*7 input at any input size (as torchvision does).
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1-conv-BN shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18: 7x7/2 stem, 3x3/2 max pool, four stages of two basic blocks, global pool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    parts: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu6:
        parts.append(nn.ReLU6())
    return nn.Sequential(*parts)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 projection, residual
    add when the block keeps resolution and width."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, relu6=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


# (expansion t, channels c, repeats n, first stride s), width multiplier 1.0
_MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0): 3x3/2 stem, 17 inverted residuals, 1x1 conv to 1280, global pool, classifier."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MOBILENETV2_SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    build: Callable[[tuple[int, int], int], nn.Module]
    default_size: tuple[int, int]
    min_size: int
    multiple: int  # input sides must be multiples of this
    description: str
    source: str


# YOLOv2 entries calibrate at 608/4 (valid for the reorg, cheap, large enough that border effects do
# not distort the statistics much); classifiers at 224/2.
_YOLO_CALIBRATION = 152
_CLASSIFIER_CALIBRATION = (2, 3, 112, 112)


def _darknet_builder(layers: int | None) -> Callable[[tuple[int, int], int], nn.Module]:
    def build(size: tuple[int, int], seed: int) -> nn.Module:
        return load_darknet(yolov2_cfg(size[0], size[1], layers=layers), seed=seed,
                            calibration_size=_YOLO_CALIBRATION)

    return build


def _code_builder(factory: Callable[[], nn.Module]) -> Callable[[tuple[int, int], int], nn.Module]:
    def build(size: tuple[int, int], seed: int) -> nn.Module:
        return seeded_init_(build_uninitialised(factory), seed, calibration_shape=_CLASSIFIER_CALIBRATION)

    return build


_REGISTRY: dict[str, _Entry] = {
    "yolov2-16": _Entry(
        _darknet_builder(16), (608, 608), 16, 1,
        "YOLOv2 layers 0-15 (12 BN-leaky convs, 4 max pools) at 608x608 -> 256x38x38; "
        "the early, spatially heavy part DeepThings partitions into fused tiles",
        "Redmon & Farhadi, YOLO9000: Better, Faster, Stronger, CVPR 2017 (arXiv:1612.08242); "
        "Zhao et al., DeepThings, IEEE TCAD 2018",
    ),
    "yolov2": _Entry(
        _darknet_builder(None), (608, 608), 32, 32,
        "YOLOv2 (COCO, 80 classes, 5 anchors) at 608x608 with passthrough route/reorg and region head "
        "-> 425x19x19",
        "Redmon & Farhadi, YOLO9000: Better, Faster, Stronger, CVPR 2017 (arXiv:1612.08242)",
    ),
    "vgg16": _Entry(
        _code_builder(VGG16), (224, 224), 32, 1,
        "VGG-16 (configuration D) at 224x224: 13 convs, 5 max pools, 3 fully connected -> 1000 logits",
        "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, "
        "ICLR 2015 (arXiv:1409.1556)",
    ),
    "resnet18": _Entry(
        _code_builder(ResNet18), (224, 224), 32, 1,
        "ResNet-18 at 224x224: 7x7/2 stem, max pool, 8 basic blocks, global pool, fc -> 1000 logits",
        "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 (arXiv:1512.03385)",
    ),
    "mobilenetv2": _Entry(
        _code_builder(MobileNetV2), (224, 224), 32, 1,
        "MobileNetV2 (width 1.0) at 224x224: inverted residuals with depthwise 3x3 and ReLU6, "
        "1x1 conv to 1280, global pool, classifier -> 1000 logits",
        "Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, CVPR 2018 (arXiv:1801.04381)",
    ),
}


def names() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModel(f"unknown zoo model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def _size(name: str, entry: _Entry, input_size: int | Sequence[int] | None) -> tuple[int, int]:
    if input_size is None:
        return entry.default_size
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)  # type: ignore[assignment]
        if len(size) != 2:
            raise ValueError(f"input_size for {name!r} must be an int or (height, width), got {input_size!r}")
    for v in size:
        if v < entry.min_size or v % entry.multiple:
            raise ValueError(
                f"input_size {size} is not valid for {name!r}: each side must be >= {entry.min_size}"
                + (f" and a multiple of {entry.multiple}" if entry.multiple > 1 else "")
            )
    return size  # type: ignore[return-value]


def get(name: str, *, input_size: int | tuple[int, int] | None = None, seed: int = 0) -> ZooModel:
    """Build ``name`` in eval mode with weights seeded by ``seed``; ``input_size`` is H=W or (H, W)."""
    entry = _entry(name)
    size = _size(name, entry, input_size)
    model = entry.build(size, seed).eval()
    return ZooModel(name, model, (3, size[0], size[1]), entry.description, entry.source)


def example(name_or_model: str | ZooModel, batch: int = 1, seed: int = 0) -> Tensor:
    """A seeded standard-normal input batch for a zoo name (its default size) or a built :class:`ZooModel`."""
    if isinstance(name_or_model, ZooModel):
        shape = name_or_model.input_shape
    else:
        h, w = _entry(name_or_model).default_size
        shape = (3, h, w)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((batch, *shape), generator=gen)
