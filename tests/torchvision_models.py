"""One model of every torchvision classification family, small, for the torchvision tests.

torchvision is a test dependency (the ``dev`` extra). The release made for the CPU torch that the
README installs (torchvision 0.28.0 beside torch 2.13.0) is a CUDA build: its compiled ops
(``torchvision/_C.so``) need ``libtorch_cuda.so`` and do not load, which torchvision tolerates,
except that its import then registers fake kernels for two ops nobody defined and fails
(``operator torchvision::nms does not exist``). :func:`import_torchvision` goes through
compressdrop's shim, which declares those two op schemas (no kernel: calling them raises) and
imports it again. The model definitions are plain Python and need none of the compiled ops.

Each family is built from its own torchvision class, small where the class takes sizes (a few
layers, narrow widths, 32×32 inputs: the MobileNets, ShuffleNetV2, RegNet X and Y and the
LR-ASPP backbone keep each kind of block their standard configuration has, stride 1 and 2,
with and without squeeze-excitation, once or twice rather than up to 12 times); where the class
fixes its layers (Inception, GoogLeNet, MNASNet) the blocks that a stage repeats at one width
are left out (replaced by ``nn.Identity``, or each stack cut to its first two blocks), one of
each kind kept; AlexNet and VGG-11-BN with their classifiers' two 4,096-wide layers at 256;
SqueezeNet at its standard size. The torch.onnx export of each, the test's cost, grows with the
number of blocks (and with the weights it writes and checks). Two inits that would hide
pruning from the output are changed, as the benchmark's "nondegenerate" variant does: the ViT
head (zeros) is drawn from N(0, 0.02), and ConvNeXt's layer scale starts at 1, not 1e-6.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def import_torchvision() -> ModuleType:
    """``import torchvision``, through compressdrop's shim for a build whose ``_C`` fails
    (``compressdrop/_torchvision.py``, loaded from its file: the child processes that check that a
    slim model loads without compressdrop use it too). tests/conftest.py calls it first, so that a
    library that imports torchvision itself (torchmetrics, under lightning) finds it imported."""
    path = Path(__file__).resolve().parents[1] / "compressdrop" / "_torchvision.py"
    spec = importlib.util.spec_from_file_location("_torchvision_shim", path)
    assert spec is not None and spec.loader is not None
    shim = sys.modules.get("_torchvision_shim") or importlib.util.module_from_spec(spec)
    if "_torchvision_shim" not in sys.modules:
        sys.modules["_torchvision_shim"] = shim
        spec.loader.exec_module(shim)
    tv = shim.import_torchvision()
    if tv is None:
        raise ModuleNotFoundError("torchvision is a test dependency: pip install -e '.[dev]'")
    return tv


def families() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """``{family: (build, input side)}``, one model per torchvision classification family."""
    tv = import_torchvision()
    m = tv.models
    from torchvision.models import (
        convnext,
        efficientnet,
        maxvit,
        mobilenetv3,
        regnet,
        resnet,
        swin_transformer,
    )
    from torchvision.models import vision_transformer as vit

    def vit_small() -> nn.Module:
        net = vit.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )
        nn.init.normal_(net.heads.head.weight, std=0.02)  # zeros by default: output 0
        return net

    def swin_small(v2: bool) -> nn.Module:
        extra = (
            {
                "block": swin_transformer.SwinTransformerBlockV2,
                "downsample_layer": swin_transformer.PatchMergingV2,
            }
            if v2
            else {}
        )
        return swin_transformer.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=[2, 2],
            num_classes=10,
            **extra,
        )

    def efficientnet_v2_small() -> nn.Module:
        fused, mb = efficientnet.FusedMBConvConfig, efficientnet.MBConvConfig
        setting = [fused(1, 3, 1, 16, 16, 1), fused(4, 3, 2, 16, 24, 1), mb(4, 3, 2, 24, 32, 1)]
        return efficientnet.EfficientNet(setting, dropout=0.2, last_channel=64, num_classes=10)

    def efficientnet_small() -> nn.Module:
        setting, last = efficientnet._efficientnet_conf(
            "efficientnet_b0", width_mult=0.25, depth_mult=0.25
        )
        return efficientnet.EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=10)

    def narrow_classifier(net: nn.Module, vgg_init: bool) -> nn.Module:
        # AlexNet's and VGG's classifiers fix two Linear layers of 4,096 (57 M and 120 M of their
        # 61 M and 133 M parameters): the same layers at 256 (the first still reads every
        # position of the last conv's channels), initialised as the class does
        layers = list(net.classifier)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                narrow = nn.Linear(
                    256 if layer.in_features == 4096 else layer.in_features,
                    256 if layer.out_features == 4096 else layer.out_features,
                )
                if vgg_init:
                    nn.init.normal_(narrow.weight, 0, 0.01)
                    nn.init.zeros_(narrow.bias)
                layers[i] = narrow
        net.classifier = nn.Sequential(*layers)
        return net

    def inception_small() -> nn.Module:
        # Mixed_5b, 5c (A), 6a (B), 6b (C), 7a (D), 7b (E): the blocks a stage repeats at the same
        # width (5d, 6c-6e, 7c) left out
        net = m.inception_v3(num_classes=10, aux_logits=False, init_weights=False)
        for name in ("Mixed_5d", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7c"):
            setattr(net, name, nn.Identity())
        return net

    def googlenet_small() -> nn.Module:
        # 3a, 3b, 4a, 4d, 4e, 5b: the blocks that keep their input's width (4b, 4c, 5a) left out
        net = m.googlenet(num_classes=10, aux_logits=False, init_weights=False)
        for name in ("inception4b", "inception4c", "inception5a"):
            setattr(net, name, nn.Identity())
        return net

    def mobilenet_v2_small() -> nn.Module:
        # expansion 1 and 6, stride 1 and 2, a residual block in two stages (17 blocks: 6)
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 1, 2]]
        return m.MobileNetV2(10, width_mult=0.35, inverted_residual_setting=setting)

    def mobilenet_v3_small() -> nn.Module:
        # mobilenet_v3_small's first five blocks: squeeze-excitation with ReLU and hard-swish,
        # none, kernels 3 and 5, stride 1 and 2, residual (11 blocks: 5)
        setting, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small")
        return mobilenetv3.MobileNetV3(setting[:5], last, num_classes=10)

    def mnasnet_small() -> nn.Module:
        # mnasnet0_5 with each stack cut to its first two blocks (16 blocks: 11)
        net = m.mnasnet0_5(num_classes=10)
        for i, layer in enumerate(net.layers):
            if isinstance(layer, nn.Sequential) and len(layer) > 2:
                net.layers[i] = layer[:2]
        return net

    def regnet_small(se: bool) -> nn.Module:
        # three stages of 1, 2, 2 blocks (regnet_x/y_400mf: 22), grouped convs of width 8
        params = regnet.BlockParams.from_init_params(
            depth=5, w_0=24, w_a=24.48, w_m=2.54, group_width=8, se_ratio=0.25 if se else None
        )
        return regnet.RegNet(params, num_classes=10)

    bottleneck = resnet.Bottleneck
    return {
        "AlexNet": (lambda: narrow_classifier(m.alexnet(num_classes=10), vgg_init=False), 64),
        # its classifier fixes 512 channels (of 7×7 positions) from the features
        "VGG": (lambda: narrow_classifier(m.vgg11_bn(num_classes=10), vgg_init=True), 32),
        "ResNet": (lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 32),
        "ResNeXt": (
            lambda: resnet.ResNet(
                bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10
            ),
            32,
        ),
        "Wide ResNet": (
            lambda: resnet.ResNet(bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10),
            32,
        ),
        "DenseNet": (
            lambda: m.DenseNet(
                growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10
            ),
            32,
        ),
        "SqueezeNet": (lambda: m.squeezenet1_1(num_classes=10), 64),
        "Inception": (inception_small, 80),
        "GoogLeNet": (googlenet_small, 64),
        "MobileNetV2": (mobilenet_v2_small, 32),
        "MobileNetV3": (mobilenet_v3_small, 32),
        "MNASNet": (mnasnet_small, 32),
        # shufflenet_v2_x0_5's widths, two blocks a stage (stride 2, then a channel split) for 4-8-4
        "ShuffleNetV2": (lambda: m.ShuffleNetV2([2, 2, 2], [24, 48, 96, 192, 1024], 10), 32),
        "EfficientNet": (efficientnet_small, 32),
        "EfficientNetV2": (efficientnet_v2_small, 32),
        "RegNetX": (lambda: regnet_small(se=False), 32),
        "RegNetY": (lambda: regnet_small(se=True), 32),
        "ConvNeXt": (
            lambda: convnext.ConvNeXt(
                [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                layer_scale=1.0,
                num_classes=10,
            ),
            32,
        ),
        "ViT": (vit_small, 32),
        "Swin": (lambda: swin_small(v2=False), 32),
        "Swin V2": (lambda: swin_small(v2=True), 32),
        "MaxViT": (
            lambda: maxvit.MaxVit(
                input_size=(32, 32),
                stem_channels=8,
                partition_size=2,
                block_channels=[16, 32],
                block_layers=[1, 1],
                head_dim=8,
                stochastic_depth_prob=0.0,
                num_classes=10,
            ),
            32,
        ),
    }


_LOAD_PICKLE = (
    "import sys, torch; sys.path.insert(0, sys.argv[2]);"
    "from torchvision_models import import_torchvision; import_torchvision();"
    "m = torch.load(sys.argv[1] + '/slim.pickle', weights_only=False).eval();"
    "x, want, state, cls = torch.load(sys.argv[1] + '/io.pt');"
    "got = m.state_dict();"
    "assert got.keys() == state.keys();"
    "assert all(torch.equal(got[k], state[k]) for k in state);"
    "assert any(type(s).__name__ == cls for s in m.modules()), cls;"
    "err = float((m(x) - want).abs().max() / want.abs().max());"
    "assert err <= 1e-6, err"
)


def loads_in_a_new_process(slim: nn.Module, x: torch.Tensor, cls: str, folder) -> None:
    """``torch.save(slim)`` loads in a new Python process that never made compressdrop's
    prunable classes: the weights and buffers bit for bit, a module of class ``cls`` present,
    the output on ``x`` to 1e-6 (another process's conv kernels may sum in another order: one
    fresh-clone CI run did, so outputs are not compared bit for bit).

    Raises:
        subprocess.CalledProcessError: the new process failed one of those checks.
    """
    import subprocess
    from pathlib import Path

    torch.save(slim, Path(folder) / "slim.pickle")
    with torch.no_grad():
        want = slim(x)
    torch.save((x, want, slim.state_dict(), cls), Path(folder) / "io.pt")
    tests = str(Path(__file__).parent)
    cmd = [sys.executable, "-c", _LOAD_PICKLE, str(folder), tests]
    subprocess.run(cmd, check=True, timeout=300)
