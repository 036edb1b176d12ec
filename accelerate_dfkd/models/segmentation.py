"""Semantic segmentation nets in the DeepLabV3 style: ``forward(x)`` returns per-pixel logits of shape
(N, num_classes, H, W) at the input's resolution.

DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
arXiv:1706.05587): a backbone whose last stages trade stride for dilation (output stride 8 or 16),
then Atrous Spatial Pyramid Pooling (ASPP, Sec. 3.3: a 1x1 conv, three 3x3 atrous convs, and
image-level pooling, each conv-BN-ReLU, concatenated and projected by a 1x1 conv-BN-ReLU), then a
classifier, and bilinear upsampling of the logits to the input size.

- ``deeplab_lite`` / ``deeplab_lite_small``: not from a paper. A tiny teacher/student pair for the
  procedural ``shapes`` set (32x32, 4 classes), sized to train on one CPU thread in a minute.
  Output stride 4, an "ASPP-lite" head (1x1, two atrous 3x3 with rates 2 and 4, image pooling).
- ``deeplabv3_resnet50`` / ``deeplabv3_mobilenetv2``: the DFAD paper's segmentation pair (CamVid,
  NYUv2; Fang et al. 2019 Sec. 4.3, supp. Table 7), written here without torchvision, following
  the reference code VainF/Data-Free-Adversarial-Distillation ``network/segmentation/``: ResNet-50
  with the strides of layer3/layer4 replaced by dilation (output stride 8), MobileNetV2's
  inverted-residual features up to the 320-channel stage at output stride 8, and the DeepLabV3
  head (ASPP with 256 channels and 0.5 dropout after the projection, conv3x3-BN-ReLU, 1x1
  classifier). Randomly initialised: the paper's teachers start from an ImageNet ResNet-50, which
  is not shipped here, and parameter names are ours, not torchvision's.

Every conv is followed by BatchNorm (no conv bias there): BN-statistics methods invert the teacher's
running statistics, and the image-pooling branch's BatchNorm needs more than one image per batch in
train() mode, as in torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2  # keeps H, W (divided by the stride)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                   bias=False),
                         nn.BatchNorm2d(cout), activation())


class ASPPPooling(nn.Module):
    """The image-level branch of ASPP: global average pool, 1x1 conv-BN-ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3 Sec. 3.3): 1x1 conv + one 3x3 atrous conv per rate +
    image pooling, concatenated, projected by a 1x1 conv-BN-ReLU, then dropout."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout, kernel_size=1)]
        branches += [conv_bn_relu(cin, cout, dilation=rate) for rate in rates]
        branches.append(ASPPPooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_bn_relu(len(branches) * cout, cout, kernel_size=1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3(nn.Module):
    """backbone -> ASPP -> [conv3x3-BN-ReLU] -> 1x1 classifier -> bilinear upsampling to the input size."""

    def __init__(self, backbone: nn.Module, backbone_channels: int, num_classes: int, *, aspp_channels: int,
                 rates: Sequence[int], dropout: float = 0.0, refine: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone_channels, aspp_channels, rates, dropout)
        # DeepLabV3's head has one more conv3x3-BN-ReLU before the classifier (torchvision/VainF DeepLabHead)
        self.refine = conv_bn_relu(aspp_channels, aspp_channels) if refine else nn.Identity()
        self.classifier = nn.Conv2d(aspp_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.refine(self.aspp(self.backbone(x))))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --- the tiny pair for the procedural shapes set -------------------------------------------------


def _lite_backbone(in_channels: int, widths: Sequence[int], dilated_blocks: int) -> nn.Sequential:
    """conv3x3(w0) -> conv3x3(w1, s2) -> conv3x3(w2, s2) [-> conv3x3(w2, dilation 2) x dilated_blocks]:
    output stride 4; the dilated convs grow the receptive field without losing resolution (DeepLab's
    atrous trade)."""
    w0, w1, w2 = widths
    layers = [conv_bn_relu(in_channels, w0), conv_bn_relu(w0, w1, stride=2), conv_bn_relu(w1, w2, stride=2)]
    layers += [conv_bn_relu(w2, w2, dilation=2) for _ in range(dilated_blocks)]
    return nn.Sequential(*layers)


def deeplab_lite(num_classes: int = 4, in_channels: int = 3) -> DeepLabV3:
    """Teacher for ``shapes`` (widths 16/32/64, one dilated block, ASPP 32 ch with the refine conv:
    about 115k parameters)."""
    return DeepLabV3(_lite_backbone(in_channels, (16, 32, 64), dilated_blocks=1), 64, num_classes,
                     aspp_channels=32, rates=(2, 4))


def deeplab_lite_small(num_classes: int = 4, in_channels: int = 3) -> DeepLabV3:
    """Student for ``shapes`` (widths 8/16/32, one dilated block, ASPP 16 ch, no refine conv: about 27k
    parameters, 4x fewer than the teacher)."""
    return DeepLabV3(_lite_backbone(in_channels, (8, 16, 32), dilated_blocks=1), 32, num_classes,
                     aspp_channels=16, rates=(2, 4), refine=False)


# --- the DFAD paper's pair: DeepLabV3-ResNet50 -> DeepLabV3-MobileNetV2 --------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck (He et al. 2016, ResNet-50 "v1.5": the stride sits on the 3x3 conv, as in
    torchvision): 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), plus the (projected) shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(cin, width, kernel_size=1),
            conv_bn_relu(width, width, stride=stride, dilation=dilation),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet50Backbone(nn.Sequential):
    """ResNet-50 without pooling/fc, output stride 8: layer3 and layer4 replace their stride 2 by
    dilation 2 and 4 (VainF `_segm_resnet`: replace_stride_with_dilation=[False, True, True]). As in
    torchvision, the first block of a dilated layer keeps the previous layer's dilation."""

    def __init__(self, in_channels: int = 3) -> None:
        layers: list[nn.Module] = [conv_bn_relu(in_channels, 64, kernel_size=7, stride=2),
                                   nn.MaxPool2d(3, stride=2, padding=1)]
        cin, dilation = 64, 1
        for width, blocks, stride, dilate in ((64, 3, 1, False), (128, 4, 2, False), (256, 6, 2, True),
                                              (512, 3, 2, True)):
            previous = dilation
            if dilate:
                dilation, stride = dilation * stride, 1
            stage = [Bottleneck(cin, width, stride, previous)]
            cin = width * Bottleneck.expansion
            stage += [Bottleneck(cin, width, 1, dilation) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018): 1x1 expand (skipped when t = 1) -> 3x3 depthwise
    (stride, dilation) -> 1x1 linear projection, ReLU6, residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        layers: list[nn.Module] = [] if expand_ratio == 1 else [conv_bn_relu(cin, hidden, 1, activation=nn.ReLU6)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=dilation, dilation=dilation, groups=hidden,
                             bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Backbone(nn.Sequential):
    """MobileNetV2 features up to the 320-channel stage (no final 1280 conv), output stride 8: once
    the stride reaches 8, later stages use stride 1 and grow the dilation instead (VainF
    `network/segmentation/mobilenet.py`, output_stride=8)."""

    # (expansion t, channels c, repeats n, stride s): MobileNetV2 Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, in_channels: int = 3, output_stride: int = 8) -> None:
        layers: list[nn.Module] = [conv_bn_relu(in_channels, 32, stride=2, activation=nn.ReLU6)]
        cin, current_stride, dilation = 32, 2, 1
        for t, c, n, s in self.SETTINGS:
            if current_stride == output_stride:
                stride, block_dilation, dilation = 1, dilation, dilation * s
            else:
                stride, block_dilation = s, 1
                current_stride *= s
            for i in range(n):
                layers.append(InvertedResidual(cin, c, stride if i == 0 else 1, block_dilation, t))
                cin = c
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # as the reference MobileNetV2 initialises


def deeplabv3_resnet50(num_classes: int = 13, in_channels: int = 3, dropout: float = 0.0) -> DeepLabV3:
    """The DFAD segmentation teacher: DeepLabV3-ResNet50 at output stride 8 (about 39.6M parameters).
    Atrous rates (12, 24, 36) for output stride 8 (DeepLabV3 Sec. 4.3; the reference code has 32 for
    the last one, a typo of torchvision's 36 as far as we can tell). Teacher dropout 0
    (DFAD_nyu_deeplab.py builds the teacher with the default dropout_p=0)."""
    return DeepLabV3(ResNet50Backbone(in_channels), 2048, num_classes, aspp_channels=256, rates=(12, 24, 36),
                     dropout=dropout)


def deeplabv3_mobilenetv2(num_classes: int = 13, in_channels: int = 3, dropout: float = 0.5) -> DeepLabV3:
    """The DFAD segmentation student: DeepLabV3-MobileNetV2 at output stride 8, dropout 0.5 after the
    ASPP projection (DFAD_nyu_deeplab.py / DFAD_camvid_deeplab.py: dropout_p=0.5, no pretrained
    backbone)."""
    return DeepLabV3(MobileNetV2Backbone(in_channels), 320, num_classes, aspp_channels=256, rates=(12, 24, 36),
                     dropout=dropout)
