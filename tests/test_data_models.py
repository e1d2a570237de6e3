"""Data loaders and reference nets."""

import gzip
import os

import numpy as np
import pytest
import torch

from compressdrop.data import (
    FASHION_MNIST_DIR,
    Dataset,
    DataWarning,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_npz,
)
from compressdrop.errors import DataError
from compressdrop.models import MODELS, TOKEN_MODELS, build_model, example_input


def test_digits_is_embedded_split_and_scaled():
    d = load_digits()
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    again = load_digits()
    assert torch.equal(d.y_test, again.y_test)  # seeded
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 40  # stratified


def test_validation_split_comes_from_train_only_and_is_disjoint():
    d = load_digits()
    train, val = d.split_validation(0.2, seed=3)
    assert torch.equal(train.x_test, d.x_test)  # the test set is untouched
    assert len(train.x_train) + len(val.x_test) == len(d.x_train)
    assert len(val.x_test) == pytest.approx(0.2 * len(d.x_train), abs=10)
    # tag every training example with its index to check that the two parts are disjoint
    tagged = Dataset(
        "t",
        torch.arange(len(d.x_train), dtype=torch.float32)[:, None],
        d.y_train,
        d.x_test[:, 0, 0, :1],
        d.y_test,
        10,
    )
    tr, va = tagged.split_validation(0.2, seed=3)
    a, b = set(tr.x_train.flatten().tolist()), set(va.x_test.flatten().tolist())
    assert not a & b and len(a | b) == len(d.x_train)


def _write_idx(path, array, gz=True):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fmnist(root, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    _write_idx(root / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _write_idx(root / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train), gz)
    _write_idx(root / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    _fake_fmnist(tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert float(d.x_train.max()) <= 1.0
    assert load_dataset(f"fashion-mnist:{tmp_path}").name == "fashion-mnist"


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_corrupt_file_names_it(tmp_path):
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="t10k-labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_sizes():
    d = load_fashion_mnist()
    assert len(d.x_train) == 60000 and len(d.x_test) == 10000


def test_npz_happy_path_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "data.npz"
    np.savez(p, x=rng.random((40, 6)).astype(np.float32), y=np.arange(40) % 4)
    d = load_npz(p)
    assert d.input_shape == (6,) and d.num_classes == 4 and len(d.x_train) == 32
    img = tmp_path / "img.npz"
    np.savez(
        img,
        x=rng.random((30, 5, 5)),
        y=np.arange(30) % 3,
        x_test=rng.random((6, 5, 5)),
        y_test=np.arange(6) % 3,
    )
    assert load_npz(img).input_shape == (1, 5, 5)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=rng.random((10, 3)))
    with pytest.raises(ValueError, match="missing array"):
        load_npz(bad)
    floaty = tmp_path / "floaty.npz"
    np.savez(floaty, x=rng.random((10, 3)), y=rng.random(10))
    with pytest.raises(ValueError, match="integer class labels"):
        load_npz(floaty)
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="unknown data"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", [n for n in MODELS if n not in TOKEN_MODELS])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 28, 28)])
def test_reference_nets_build_for_both_input_sizes(name, shape):
    m = build_model(name, shape, 10)
    out = m.eval()(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    again = build_model(**{k: v for k, v in m.arch.items() if k != "kwargs"}, **m.arch["kwargs"])
    assert str(again) == str(m)


def test_the_language_model_reference_net_rebuilds_from_its_record():
    pytest.importorskip("transformers")
    m = build_model("hf-causal-lm", (24,), 256, model_type="gpt2", n_layer=1, n_embd=32, n_head=2)
    x = example_input(m, 3)
    assert x.dtype == torch.int64 and x.shape == (3, 24) and int(x.max()) < 256
    assert m.eval()(x).logits.shape == (3, 24, 256)
    assert m.config.use_cache is False and m.config.n_positions >= 24
    again = build_model(**{k: v for k, v in m.arch.items() if k != "kwargs"}, **m.arch["kwargs"])
    assert str(again) == str(m)
    with pytest.raises(ValueError, match="hf-causal-lm"):
        build_model("hf-causal-lm", (8,), 256, model_type="no-such-model")


def test_published_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("lenet300", (1, 28, 28))) == 266_610
    assert count(build_model("lenet5", (1, 28, 28))) == 431_080
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet")


def test_flops_are_the_known_closed_forms_for_linear_conv_and_recurrent_nets():
    from torch import nn

    from compressdrop.evaluation import count_flops

    # LeNet-300-100: 2 FLOPs per multiply-add of each Linear
    assert count_flops(build_model("lenet300"), torch.rand(1, 1, 28, 28)) == 2 * (
        784 * 300 + 300 * 100 + 100 * 10
    )
    # a 2-layer LSTM over 28 steps: PyTorch's counter has no formula for the fused kernel, so the
    # recurrent part is counted from the shapes, 2·4·H·(I + H) per step and layer, and only once
    net = build_model("lstm_rows", input_shape=(1, 28, 28), hidden=32, layers=2, stacked=True)
    per_step = 2 * 4 * 32 * (28 + 32) + 2 * 4 * 32 * (32 + 32)
    assert count_flops(net, torch.rand(1, 1, 28, 28)) == 28 * per_step + 2 * 32 * 10
    gru = nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)  # count_flops: x[:1]
    assert count_flops(gru, torch.rand(1, 5, 8)) == 2 * 5 * (2 * 3 * 16 * (8 + 16)) + 2 * 5 * (
        2 * 3 * 16 * (32 + 16)
    )


def test_flops_of_attention_count_projections_and_scores_in_eval_mode():
    from torch import nn

    from compressdrop.evaluation import count_flops

    # eval mode and no_grad put nn.TransformerEncoderLayer on PyTorch's fused inference path,
    # which the counter cannot see into; the attention scores run in the CPU kernel of
    # scaled_dot_product_attention, which it has no formula for. Both are counted.
    d, t, mlp = 32, 9, 64
    layer = nn.TransformerEncoderLayer(d, 4, mlp, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    per_layer = 2 * t * (3 * d * d + d * d + 2 * d * mlp) + 2 * (2 * t * t * d)  # + Q·Kᵀ, A·V
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_flops(net, torch.rand(1, t, d)) == 2 * per_layer
    assert torch.backends.mha.get_fastpath_enabled()  # restored

    class Causal(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    assert count_flops(Causal(), torch.rand(1, 2, t, 8)) == 2 * (2 * 2 * t * t * 8)


def test_the_vision_transformer_reference_net():
    from compressdrop.errors import InputError
    from compressdrop.evaluation import count_flops

    vit = build_model("vit")  # 16 patches of 7×7, width 64, 4 layers of 4 heads, MLP 128
    assert vit(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    t, d = 17, 64  # tokens (16 patches and the class token), width
    layer = 2 * t * (3 * d * d + d * d + 2 * d * 128) + 2 * (2 * t * t * d)
    assert count_flops(vit, torch.rand(1, 1, 28, 28)) == 2 * 16 * d * 49 + 4 * layer + 2 * d * 10
    assert sum(p.numel() for p in vit.parameters()) == 139_018
    # the final LayerNorm reads the class token alone (the same logits as normalizing every token:
    # it acts per token), so that its exported graph has no residual Add before it to fuse
    seen = []
    vit.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.rand(3, 1, 28, 28)
    out = vit(x)
    assert seen == [(3, 64)]
    t = vit.patch(x).flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls.expand(3, -1, -1), t], dim=1) + vit.pos
    assert torch.allclose(out, vit.head(vit.norm(vit.encoder(t))[:, 0]), atol=1e-6, rtol=0)
    a = vit.arch
    assert build_model(a["name"], a["input_shape"], a["num_classes"], **a["kwargs"]).arch == a
    assert build_model("vit", (1, 8, 8)).arch["kwargs"]["patch"] == 2  # a 4×4 grid by default
    with pytest.raises(InputError, match="patch 3 does not tile a 8×8"):
        build_model("vit", (1, 8, 8), patch=3)
    with pytest.raises(InputError, match="not a multiple of 3 heads"):
        build_model("vit", (1, 8, 8), patch=2, heads=3)


# A new-user walk through `.npz` data: each problem is refused (or fixed and said) at load time,
# in an error that names the file and the array.


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _refusal(path) -> str:
    with pytest.raises(DataError) as e:
        load_npz(path)
    message = str(e.value)
    assert str(path) in message and "allow_pickle" not in message
    assert "never unpickles" in message or "not a readable .npz" in message
    return message


def test_npz_refuses_pickled_and_foreign_files_without_suggesting_unpickling(tmp_path):
    y = np.arange(10) % 2
    obj = _npz(tmp_path / "obj.npz", x=np.zeros((10, 3)), y=np.array(list(y), dtype=object))
    assert "array 'y' holds Python objects (dtype=object)" in _refusal(obj)
    (tmp_path / "text.npz").write_text("x,y\n1,0\n")
    assert "not a zip of .npy arrays" in _refusal(tmp_path / "text.npz")
    import pickle

    (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"x": [1.0], "y": [0]}))
    assert "never unpickles" in _refusal(tmp_path / "pickled.npz")
    np.save(tmp_path / "one.npy", np.zeros((10, 3)))
    (tmp_path / "one.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    assert "holds one array (an .npy file)" in _refusal(tmp_path / "one.npz")


@pytest.mark.parametrize("which", ["x", "x_test"])
def test_npz_refuses_nan_and_inf_inputs_by_array_and_count(tmp_path, which):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.random((20, 6)),
        "y": np.arange(20) % 2,
        "x_test": rng.random((6, 6)),
        "y_test": np.arange(6) % 2,
    }
    arrays[which][1, 2] = np.nan
    arrays[which][1, 3] = np.nan
    arrays[which][4, 0] = -np.inf
    p = _npz(tmp_path / "holes.npz", **arrays)
    with pytest.raises(
        DataError, match=rf"holes\.npz: {which} has 3 non-finite values \(2 NaN, 1 ±Inf\) in 2 "
    ):
        load_npz(p)
    # float64 values past float32's range would become inf in training
    big = _npz(tmp_path / "big.npz", x=np.full((8, 2), 1e300), y=np.arange(8) % 2)
    with pytest.raises(DataError, match=r"big\.npz: x has 16 values too large for float32"):
        load_npz(big)


def test_npz_scales_uint8_pixels_to_the_unit_range(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    pixels[0, 0, 0, 0] = 255
    y = np.arange(20) % 2
    d = load_npz(_npz(tmp_path / "u8.npz", x=pixels, y=y, x_test=pixels[:4], y_test=y[:4]))
    assert float(d.x_train.max()) == 1.0 and float(d.x_test.min()) >= 0.0
    assert torch.allclose(d.x_train, torch.from_numpy(pixels.astype(np.float32) / 255.0))
    # floats (and wider integers) are taken as they are
    floats = pixels.astype(np.float32)
    d = load_npz(_npz(tmp_path / "f32.npz", x=floats, y=y, x_test=floats[:4], y_test=y[:4]))
    assert torch.equal(d.x_train, torch.from_numpy(floats))
    # the training array decides for both splits: a uint8 x with an int64 x_test trained on
    # [0, 1] and tested on [0, 255]
    wide = pixels[:4].astype(np.int64)
    d = load_npz(_npz(tmp_path / "mixed.npz", x=pixels, y=y, x_test=wide, y_test=y[:4]))
    assert torch.allclose(d.x_test, torch.from_numpy(wide.astype(np.float32) / 255.0))


def test_npz_transposes_channels_last_images_and_says_so_once(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.random((12, 8, 6, 3)), rng.random((4, 8, 6, 3))  # (N, H, W, C)
    y, y_test = np.arange(12) % 2, np.arange(4) % 2
    p = _npz(tmp_path / "nhwc.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    with pytest.warns(DataWarning, match=r"x and x_test read as channels-last") as seen:
        d = load_npz(p)
    assert len(seen) == 1 and "(N, 3, 8, 6)" in str(seen[0].message)
    assert d.input_shape == (3, 8, 6)
    assert np.allclose(d.x_train.numpy(), x.transpose(0, 3, 1, 2).astype(np.float32))
    assert np.allclose(d.x_test.numpy(), x_test.transpose(0, 3, 1, 2).astype(np.float32))
    # channels first, or a last axis that is not a channel count: as given, without a word
    for shape in [(12, 3, 8, 6), (12, 3, 8, 3), (12, 8, 6, 5)]:
        q = _npz(tmp_path / "nchw.npz", x=rng.random(shape), y=y)
        assert load_npz(q).input_shape == shape[1:]


def test_npz_labels_a_model_cannot_be_trained_on_are_refused_for_training_only(tmp_path):
    """Labels like y*10+3 gave a 34-output model, one class a 1-output one; both are refused
    before training, while evaluation and out-of-distribution files may hold a subset of the
    classes, or one (a review found the first version of this refusing those too)."""
    from compressdrop.data import check_trainable

    rng = np.random.default_rng(0)
    x, y = rng.random((40, 6)), np.arange(40) % 4
    sparse = load_npz(_npz(tmp_path / "sparse.npz", x=x, y=y * 10 + 3))
    assert sparse.num_classes == 34  # loads: an evaluation set may be a subset of the classes
    with pytest.raises(
        DataError, match=r"sparse: labels must be 0\.\.K-1 .* 4 distinct labels \(3, 13, 23"
    ) as e:
        check_trainable(sparse)
    assert "34 outputs" in str(e.value) and "np.unique(y, return_inverse=True)" in str(e.value)
    one = load_npz(_npz(tmp_path / "one.npz", x=x, y=np.zeros(40, dtype=np.int64)))
    with pytest.raises(DataError, match=r"one: the training labels have only one class \(0\)"):
        check_trainable(one)
    split = {"x": x[:30], "y": y[:30], "x_test": x[30:], "y_test": y[30:]}
    for given in ("x_test", "y_test"):
        half = {k: v for k, v in split.items() if k != given}
        p = _npz(tmp_path / "half.npz", **half)
        with pytest.raises(DataError, match=rf"half\.npz: has '\w+_test' but no '{given}'"):
            load_npz(p)
    unseen = load_npz(_npz(tmp_path / "unseen.npz", **{**split, "y": y[:30] % 3}))
    with pytest.raises(DataError, match=r"unseen: the test labels have 3 that the training"):
        check_trainable(unseen)
    # a class absent from the test split is accepted, as before
    d = load_npz(_npz(tmp_path / "few.npz", **{**split, "y_test": y[30:] % 3}))
    assert d.num_classes == 4
    check_trainable(d)
    # the CLI refuses before any training; eval of the same file runs
    from click.testing import CliRunner

    from compressdrop.cli import main

    res = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path / "sparse.npz"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "labels must be 0..K-1" in res.output
    assert not (tmp_path / "o").exists()
    # and the API's run_recipe, before any work (the CLI's check alone left it out)
    from compressdrop.recipes import load_recipe
    from compressdrop.training.runner import run_recipe

    with pytest.raises(DataError, match=r"labels must be 0\.\.K-1"):
        run_recipe(load_recipe("lenet300-lognormal"), sparse, tmp_path / "api")
    assert not (tmp_path / "api").exists()
