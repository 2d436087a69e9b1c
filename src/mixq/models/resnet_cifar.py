"""CIFAR-10 ResNets (He et al. 2016, section 4.2): 3 stages of n basic blocks with 16/32/64
channels, option-A shortcuts (stride-2 subsampling plus zero-padded channels), the model
family of the HAWQ papers. Parameter names match the pretrained checkpoints in
`shared/data/vision/resnet_cifar10/` (`conv1`, `bn1`, `layer{1,2,3}.{i}.conv{1,2}`, `linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# depth = 6n + 2
DEPTH_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9}


class _PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the channel dimension on both sides."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in DEPTH_BLOCKS:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(DEPTH_BLOCKS)}, got {depth}")
        n = DEPTH_BLOCKS[depth]
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (batch, 64)
        return self.linear(out)
