"""Reference nets of the literature, each buildable for 8×8 (digits) and 28×28 (Fashion-MNIST).

Every model built here carries ``model.arch``: plain data (name, input shape, classes, keyword
arguments) from which :func:`build_model` rebuilds the same structure; checkpoints store it so
that loading never needs pickled code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..hf_files import LAYER_FIELDS, LAYER_SPARE, numbered_layers
from .hf import hf_causal_lm
from .record import tag as _tag
from .vit import TinyViT, vit_tiny

__all__ = [
    "MODELS",
    "BasicBlock",
    "TinyViT",
    "build_model",
    "example_input",
    "hf_causal_lm",
    "lenet5_caffe",
    "lenet300_100",
    "lstm_rows",
    "resnet_small",
    "too_deep",
    "vgg_like",
    "vit_tiny",
]

Shape = Sequence[int]


def _flat_size(features: nn.Module, input_shape: Shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


def lenet300_100(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-300-100: flatten → 300 → 100 → classes, ReLU (LeCun et al. 1998).

    Args:
        input_shape: one example's shape; flattened.
        num_classes: outputs of the last layer.
    """
    d = math.prod(input_shape)  # plain ints: builds on the meta device too
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
    return _tag(model, "lenet300", input_shape, num_classes)


class LeNet5Caffe(nn.Module):
    """Caffe's LeNet-5: conv 20 (5×5) → pool → conv 50 (5×5) → pool → fc 500 → classes.

    At 28×28 it is the 20-50-800-500 net of the pruning literature (431,080 parameters); inputs
    smaller than 20×20 get padding 2 so that the two 5×5 convolutions still fit. ``dropout`` > 0
    puts a dropout layer before each fully connected layer (for Monte-Carlo dropout).
    """

    def __init__(
        self, input_shape: Shape = (1, 28, 28), num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        pad = 2 if min(input_shape[1:]) < 20 else 0
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 20, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        drop = (lambda: [nn.Dropout(dropout)]) if dropout > 0 else list
        self.classifier = nn.Sequential(
            nn.Flatten(),
            *drop(),
            nn.Linear(_flat_size(self.features, input_shape), 500),
            nn.ReLU(),
            *drop(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        return self.classifier(self.features(x))


def lenet5_caffe(
    input_shape: Shape = (1, 28, 28), num_classes: int = 10, dropout: float = 0.0
) -> nn.Module:
    """Build a :class:`LeNet5Caffe` with its ``arch`` record.

    Args:
        input_shape: one image's ``(C, H, W)``.
        num_classes: outputs of the last layer.
        dropout: rate of the dropout layers before the fully connected ones; 0: none.
    """
    extra = {"dropout": dropout} if dropout > 0 else {}
    model = LeNet5Caffe(input_shape, num_classes, dropout)
    return _tag(model, "lenet5", input_shape, num_classes, **extra)


def vgg_like(
    input_shape: Shape = (1, 28, 28), num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)
) -> nn.Module:
    """VGG-like: stages of two conv-BN-ReLU blocks with max-pooling between them, then an MLP head.

    The head is Linear-BN-ReLU-Linear after a global average pool: the shape of the VGG-like CIFAR
    nets in Bayesian pruning papers. Pooling stops once the feature maps are smaller than 4×4.

    Args:
        input_shape: one image's ``(C, H, W)``.
        num_classes: outputs of the last layer.
        widths: channels of each stage.
    """
    layers: list[nn.Module] = []
    c = input_shape[0]
    size = min(input_shape[1:])
    for i, w in enumerate(widths):
        for _ in range(2):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        if i < len(widths) - 1 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(
        nn.Sequential(*layers),
        nn.Sequential(
            nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.ReLU(), nn.Linear(2 * c, num_classes)
        ),
    )
    return _tag(model, "vgg", input_shape, num_classes, widths=tuple(widths))


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    The shortcut is the identity, or a 1×1 conv-BN when the stride or the width changes.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: of the first convolution (2 halves the feature maps).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()  # a module (no weights): a gated bn1 hands its kept tensor to it
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "relu" not in self._modules:  # a block pickled before it had its ReLU module
            self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: stem conv-BN-ReLU, stages of BasicBlocks, global average pool, Linear.

    Stage i has ``blocks[i]`` blocks of ``widths[i]`` channels; every stage after the first starts
    with a stride-2 block.
    """

    def __init__(
        self,
        input_shape: Shape = (1, 28, 28),
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet_small(
    input_shape: Shape = (1, 28, 28),
    num_classes: int = 10,
    widths: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] = (1, 1, 1),
) -> nn.Module:
    """Build a :class:`ResNetSmall` with its ``arch`` record.

    Args:
        input_shape: one image's ``(C, H, W)``.
        num_classes: outputs of the last layer.
        widths: channels of each stage.
        blocks: basic blocks in each stage.
    """
    model = ResNetSmall(input_shape, num_classes, widths, blocks)
    return _tag(
        model, "resnet", input_shape, num_classes, widths=tuple(widths), blocks=tuple(blocks)
    )


class RowLSTM(nn.Module):
    """Reads an image row by row (H steps of C·W features): LSTM layers, then a Linear.

    The Linear reads the last step's output. ``stacked=True`` builds one one-layer LSTM module per
    layer (what gates need: each layer's hidden units get their own gate); ``False`` one
    multi-layer module.
    """

    def __init__(
        self,
        input_shape: Shape,
        num_classes: int,
        hidden: int,
        layers: int,
        scheme: str,
        p: float,
        stacked: bool,
    ) -> None:
        from ..dropout.recurrent import LSTM

        super().__init__()
        c, _, w = input_shape
        if stacked:
            sizes = [c * w] + [hidden] * layers
            self.rnn = nn.ModuleList(
                LSTM(a, b, scheme=scheme, p=p) for a, b in zip(sizes[:-1], sizes[1:])
            )
        else:
            self.rnn = nn.ModuleList([LSTM(c * w, hidden, layers, scheme=scheme, p=p)])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        y = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C·W): one row per step
        for layer in self.rnn:
            y, _ = layer(y)
        return self.head(y[:, -1])


def lstm_rows(
    input_shape: Shape = (1, 28, 28),
    num_classes: int = 10,
    hidden: int = 128,
    layers: int = 2,
    scheme: str = "none",
    p: float = 0.0,
    stacked: bool = True,
) -> nn.Module:
    """Build a :class:`RowLSTM`: an LSTM classifier that reads images row by row.

    On Fashion-MNIST that is 28 steps of 28 features.

    Args:
        input_shape: one image's ``(C, H, W)``.
        num_classes: outputs of the last layer.
        hidden: hidden units of each LSTM layer.
        layers: LSTM layers.
        scheme: recurrent dropout scheme (see :mod:`compressdrop.dropout.recurrent`).
        p: recurrent dropout rate.
        stacked: one one-layer LSTM module per layer (gateable) rather than one multi-layer one.
    """
    model = RowLSTM(input_shape, num_classes, hidden, layers, scheme, p, stacked)
    kwargs = {"hidden": hidden, "layers": layers, "scheme": scheme, "p": p, "stacked": stacked}
    return _tag(model, "lstm_rows", input_shape, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "hf-causal-lm": hf_causal_lm,
    "lstm_rows": lstm_rows,
    "lenet300": lenet300_100,
    "lenet5": lenet5_caffe,
    "vgg": vgg_like,
    "resnet": resnet_small,
    "vit": vit_tiny,
}


#: reference nets whose inputs are token ids, not float features
TOKEN_MODELS = frozenset({"hf-causal-lm"})


def build_model(
    name: str, input_shape: Shape = (1, 28, 28), num_classes: int = 10, **kwargs: Any
) -> nn.Module:
    """Build a reference net by name, with the ``arch`` record that checkpoints store.

    Args:
        name: a key of :data:`MODELS`: ``"lenet300"``, ``"lenet5"``, ``"vgg"``, ``"resnet"``,
            ``"vit"``, ``"lstm_rows"`` or ``"hf-causal-lm"``.
        input_shape: one example's ``(C, H, W)``.
        num_classes: outputs of the last layer.
        **kwargs: the builder's own options (``widths=`` for ``"vgg"``, say).

    Raises:
        InputError: an unknown name.

    Example:
        >>> net = build_model("lenet300", input_shape=(1, 8, 8))
        >>> net.arch["name"], net(example_input(net)).shape
        ('lenet300', torch.Size([2, 10]))
    """
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A standard-normal batch ``(batch, *input_shape)`` of the shape in ``model.arch`` (random
    token ids below ``num_classes`` for a language model).

    Raises:
        AttributeError: ``model`` has no ``arch`` record.
    """
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        raise AttributeError(f"{type(model).__name__} has no `arch` record (see build_model)")
    if arch.get("name") in TOKEN_MODELS:
        return torch.randint(0, int(arch["num_classes"]), (batch, *arch["input_shape"]))
    return torch.randn(batch, *arch["input_shape"])


# arguments that count the layers (or blocks) a reference net builds one by one: resnet's
# blocks (per stage), the ViT's depth, hf-causal-lm's config fields
_COUNTS = ("blocks", "depth", *LAYER_FIELDS)


def too_deep(kwargs: Mapping[str, Any], names: Iterable[str]) -> str | None:
    """Where a reference net's ``kwargs`` (an ``arch`` record's) ask for more layers than the
    weights' ``names`` number (:func:`~compressdrop.hf_files.numbered_layers`), more than
    :data:`~compressdrop.hf_files.LAYER_SPARE` times over plus as many again: a net builds its
    layers one by one, on the ``meta`` device too (``blocks: [10**12, 1, 1]`` never ended). A
    list of sizes (``widths``) builds a layer per size; sub-configs are read too (their other
    lists of numbers, token ids, are no layers)."""
    return _too_deep(kwargs, numbered_layers(names), 0)


def _too_deep(kwargs: Mapping[str, Any], numbered: int, depth: int) -> str | None:
    bound = LAYER_SPARE * numbered + LAYER_SPARE
    for key, value in kwargs.items():
        ints = isinstance(value, list | tuple) and all(type(v) is int for v in value)
        count = sum(value) if ints and key in _COUNTS else len(value) if ints else value
        if type(count) is int and key in (*_COUNTS, "widths") and count > bound:
            return (
                f"its arch record's {key} asks for {count:,} layers, its weights number {numbered}"
            )
        if (
            isinstance(value, Mapping)
            and depth < 32
            and (why := _too_deep(value, numbered, depth + 1))
        ):
            return why
    return None
