"""A zoo of small architectures for the surgery and export invariants (not a test module)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop import add_safe_factories
from compressdrop.models import build_model


def _tag(model: nn.Module, input_shape) -> nn.Module:
    model.arch = {
        "factory": f"tests.zoo:{type(model).__name__}",
        "input_shape": list(input_shape),
        "num_classes": 10,
        "kwargs": {},
    }
    return model


class ConcatNet(nn.Module):
    """Inception-like: two conv branches concatenated along channels, then conv-BN."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c = input_shape[0]
        self.b1 = nn.Sequential(nn.Conv2d(c, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(c, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.b3 = nn.Conv2d(c, 4, 3, padding=1)
        self.mix = nn.Conv2d(15, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        x = torch.cat([self.b1(x), self.b2(x), torch.relu(self.b3(x))], dim=1)
        x = torch.relu(self.bn(self.mix(x)))
        return self.fc(x.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """MobileNet-like: conv-BN-ReLU, then (depthwise 3×3-BN-ReLU, pointwise 1×1-BN-ReLU) × 2."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c = input_shape[0]

        def block(c_in, c_out, stride):
            return nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU(),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        self.stem = nn.Sequential(
            nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.blocks = nn.Sequential(block(8, 12, 2), block(12, 16, 1))
        self.fc = nn.Linear(16, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class Conv1dNet(nn.Module):
    """Conv1d-BN-ReLU × 2, pooling, flatten into Linear; input (C, L)."""

    def __init__(self, input_shape=(3, 16), num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(input_shape[0], 8, 3, padding=1),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 10, 3, padding=1),
            nn.BatchNorm1d(10),
            nn.ReLU(),
        )
        self.fc1 = nn.Linear(10 * (input_shape[1] // 2), 20)
        self.fc2 = nn.Linear(20, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


class FunctionalNet(nn.Module):
    """Written with functional ops: torch.relu, torch.cat, x + y, torch.flatten, F.max_pool2d."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c = input_shape[0]
        self.a = nn.Conv2d(c, 6, 3, padding=1)
        self.b = nn.Conv2d(c, 6, 3, padding=1)
        self.c = nn.Conv2d(12, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * (input_shape[1] // 2) * (input_shape[2] // 2), 24)
        self.fc2 = nn.Linear(24, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        z = torch.relu(self.c(y))
        z = torch.relu(self.d(z) + z)
        z = torch.flatten(F.max_pool2d(z, 2), 1)
        return self.fc2(torch.relu(self.fc1(z)))


class DeconvNet(nn.Module):
    """Encoder-decoder-like: conv, a strided ConvTranspose2d-BN-ReLU upsampling, a 1×1 conv."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c, h, w = input_shape
        self.down = nn.Conv2d(c, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 8, 2, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * h * w, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        z = torch.relu(self.bn(self.up(torch.relu(self.down(x)))))
        return self.fc(torch.relu(self.mix(z)).flatten(1))


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, activation: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = (
            nn.Conv2d(c, squeeze, 1),
            nn.Conv2d(squeeze, c, 1),
            activation,
        )

    def forward(self, x):
        scale = self.act(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return scale * x


class SENet(nn.Module):
    """EfficientNet/MobileNetV3-like: conv-BN-ReLU blocks with squeeze-excitation (sigmoid, then
    hard sigmoid) scaling their channels."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c = input_shape[0]
        self.c1, self.b1 = nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1 = _SqueezeExcite(8, 4, nn.Sigmoid())
        self.c2, self.b2 = nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10)
        self.se2 = _SqueezeExcite(10, 4, nn.Hardsigmoid())
        self.fc = nn.Linear(10, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        x = self.se1(torch.relu(self.b1(self.c1(x))))
        x = self.se2(torch.relu(self.b2(self.c2(x))))
        return self.fc(x.mean((2, 3)))


class ViTBlock(nn.Module):
    """torchvision's EncoderBlock: pre-norm nn.MultiheadAttention and MLP, both residual."""

    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """A small vision transformer as torchvision builds one: conv patches, class token, learned
    position embedding, pre-norm blocks, the class token's final norm into a Linear head."""

    def __init__(
        self, input_shape=(1, 8, 8), num_classes=10, d=16, heads=4, patch=4, depth=2, mlp=32
    ):
        super().__init__()
        c, h, w = input_shape
        self.conv_proj = nn.Conv2d(c, d, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, d) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(d, heads, mlp) for _ in range(depth)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


class _Bottleneck(nn.Module):
    """1×1 → grouped 3×3 → (squeeze-excitation) → 1×1, each conv with BN, plus the shortcut."""

    def __init__(self, c_in, c_out, width, groups, stride=1, se=False):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width))
        self.b = nn.Sequential(
            nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(width)
        )
        self.se = _SqueezeExcite(width, 4, nn.Sigmoid()) if se else nn.Identity()
        self.c = nn.Sequential(nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.proj = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        y = self.se(torch.relu(self.b(torch.relu(self.a(x)))))
        return torch.relu(self.proj(x) + self.c(y))


class ResNeXtNet(nn.Module):
    """ResNeXt/RegNetX-like: bottlenecks whose 3×3 convs have groups (4 of 4, then 3 of 8)."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10, se=False):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.blocks = nn.Sequential(
            _Bottleneck(12, 12, 16, 4, se=se), _Bottleneck(12, 20, 24, 3, stride=2, se=se)
        )
        self.fc = nn.Linear(20, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class RegNetYNet(ResNeXtNet):
    """RegNetY-like: the ResNeXt bottlenecks with squeeze-excitation after the grouped conv."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__(input_shape, num_classes, se=True)


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()  # (N, C/g, g, H, W)
    return x.view(n, c, h, w)


class _ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: split (stride 1) or copy (stride 2) the input, a 1×1 → depthwise 3×3
    → 1×1 branch, concatenate, shuffle the channels."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        half = c_out // 2
        inner = c_in if stride > 1 else c_in // 2
        self.stride = stride
        self.branch1 = (
            nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
            if stride > 1
            else nn.Identity()
        )
        self.branch2 = nn.Sequential(
            nn.Conv2d(inner, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2-like: a stride-2 and a stride-1 shuffle unit between a stem and a 1×1 conv."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(_ShuffleBlock(8, 16, 2), _ShuffleBlock(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, num_classes)
        _tag(self, input_shape)

    def forward(self, x):
        return self.fc(self.head(self.stage(self.stem(x))).mean((2, 3)))


def _ref(name, shape, **kw):
    return lambda: build_model(name, shape, 10, **kw)


ZOO = {
    "lenet300": _ref("lenet300", (1, 8, 8)),
    "lenet5": _ref("lenet5", (1, 8, 8)),
    "vgg": _ref("vgg", (1, 8, 8), widths=(8, 12, 16)),
    "resnet": _ref("resnet", (1, 8, 8), widths=(8, 12, 16), blocks=(2, 1, 1)),
    "resnet28": _ref("resnet", (1, 28, 28), widths=(6, 8, 10)),
    "vit_tiny": _ref("vit", (1, 8, 8), patch=2, dim=16, depth=2, heads=4, mlp=24),
    "concat": lambda: ConcatNet(),
    "depthwise": lambda: DepthwiseNet(),
    "conv1d": lambda: Conv1dNet(),
    "functional": lambda: FunctionalNet(),
    "deconv": lambda: DeconvNet(),
    "squeeze_excite": lambda: SENet(),
    "vit": lambda: ViT(),
    "resnext": lambda: ResNeXtNet(),
    "regnety": lambda: RegNetYNet(),
}  # a hand-written ShuffleNet leaves its shuffled channels ungated with a warning: tests/test_grouped.py


# The GatingWarning each zoo net is expected to give (a part of its message); any other fails.
EXPECTED_WARNINGS = {  # their residual streams
    "vit": "LayerNorm, which does not map 0 to 0",
    "vit_tiny": "LayerNorm, which does not map 0 to 0",
}


def attach_zoo(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """``cd.attach(model, **kwargs)``, letting through only the zoo net's expected warning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cd.attach(model, **kwargs)
    expected = EXPECTED_WARNINGS.get(name)
    for w in record:
        if not (w.category is cd.GatingWarning and expected and expected in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm non-trivial statistics and affine parameters, so that exactness is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def input_for(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *model.arch["input_shape"])


# Consent given in code: checkpoints of these nets name their classes as factories.
add_safe_factories([ConcatNet, DepthwiseNet, Conv1dNet, FunctionalNet, DeconvNet, SENet, ViT])
add_safe_factories([ResNeXtNet, RegNetYNet, ShuffleNet])
