"""A state_dict saved as safetensors (`safetensors.torch.save_file`, a Hugging Face
`model.safetensors`) is a model file like a `torch.save`d one: read with --arch, no pickle; a
damaged one is a clear error."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file  # a dependency of compressdrop

from compressdrop.checkpoint import CheckpointError, load_model

from .test_cli import run
from .test_formats import user_net

ARCH = "tests.test_formats:user_net"


def test_a_safetensors_state_dict_loads_with_its_factory_and_is_pruned(tmp_path):
    """`prune weights.safetensors --arch ...` said "not a readable PyTorch file (corrupt or
    truncated?)": the file was taken for a damaged torch.save."""
    torch.manual_seed(0)
    net = user_net(num_classes=10).eval()
    path = tmp_path / "weights.safetensors"
    save_file(net.state_dict(), path, metadata={"format": "pt"})
    got = load_model(path, arch=ARCH, arch_kwargs={"num_classes": 10})
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(got(x), net(x))
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_file(half, tmp_path / "half.safetensors")  # dtypes come back as they were written
    back = load_model(tmp_path / "half.safetensors", arch=ARCH, arch_kwargs={"num_classes": 10})
    for k, v in half.items():
        assert torch.equal(back.state_dict()[k], v), k
    res = run(["eval", path, "--arch", ARCH, "--arch-arg", "num_classes=10", "--data", "digits"])
    assert "accuracy" in res.stdout
    res = run(["eval", path, "--data", "digits"], expect=1)  # the structure is still needed
    assert "bare state_dict" in res.stderr and "--arch" in res.stderr


def _file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "name, header, data, message",
    [
        ("truncated", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 9,
         "file not fully covered"),
        ("short entry", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 4,
         "invalid shape, data type, or offset"),
        ("dtype", {"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8,
         "unknown variant `X9`"),
        ("shape", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
         "integer `-1`"),
        ("entry", {"w": [1, 2]}, b"", "invalid JSON in header"),
        ("huge", {"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 4,
         "file not fully covered"),
        ("overlap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
         "invalid offset for tensor"),
    ],
)  # fmt: skip
def test_a_damaged_safetensors_file_is_named_and_loads_nothing(
    tmp_path, name, header, data, message
):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_file(header, data))
    with pytest.raises(CheckpointError, match=f"a damaged safetensors file .*{message}") as info:
        load_model(path, arch=ARCH)
    assert str(path) in str(info.value), name


def test_a_safetensors_file_cut_short_names_the_tensor_it_lost(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.ones(3), "b": torch.ones(5)}, whole)
    whole.write_bytes(whole.read_bytes()[:-4])  # the last tensor's last value
    with pytest.raises(CheckpointError, match=r"damaged safetensors file .*not fully covered"):
        load_model(whole, arch=ARCH)
