"""The CUDA paths: gated training step, surgery, recipe run, sweep and bf16 autocast on a GPU.

Skipped (cleanly, as a whole module) where torch sees no CUDA device; run on a GPU machine with
``pytest tests/test_cuda.py``.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import compressdrop
from compressdrop.cli import main
from compressdrop.models import build_model

from tests.test_cli import tiny_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exactness checks compare in full float32 (cuDNN convolutions default to TF32)."""
    from compressdrop.pruning.surgery import full_fp32

    with full_fp32():
        yield


@pytest.mark.parametrize("family", ["lognormal", "variational", "concrete", "hardconcrete"])
def test_gated_step_and_surgery_on_cuda(family):
    torch.manual_seed(0)
    net = build_model("lenet5", input_shape=(1, 28, 28)).cuda()
    compressdrop.attach(net, gate=family, kl_cost="flops")
    x, y = torch.randn(16, 1, 28, 28, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    loss = F.cross_entropy(net(x), y) + compressdrop.kl(net) / 1000
    loss.backward()
    assert all(p.grad is not None for _, g in compressdrop.named_gates(net) for p in g.parameters())
    for _, g in compressdrop.named_gates(net):  # make some units prunable
        with torch.no_grad():
            g.pruned[: g.num_units // 3] = True
    net.eval()
    slim = compressdrop.prune(net)
    assert next(slim.parameters()).is_cuda
    with torch.no_grad():
        compressdrop.mask_(net)
        torch.testing.assert_close(slim(x), net(x), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_gate_math_in_float32():
    net = build_model("lenet300", input_shape=(1, 8, 8)).cuda()
    compressdrop.attach(net, gate="lognormal")
    x = torch.randn(32, 1, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
        kl = compressdrop.kl(net)
        snr = next(iter(compressdrop.named_gates(net)))[1].snr()
    assert out.dtype == torch.bfloat16
    assert kl.dtype == torch.float32 and snr.dtype == torch.float32
    assert torch.isfinite(kl)


def _train_on_cuda(tmp_path, *extra: str) -> dict:
    """``compressdrop train`` of the tiny recipe on the GPU; returns its JSON report."""
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--recipe",
            str(tiny_recipe(tmp_path / "t.yaml")),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cuda",
            *extra,
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["device"].startswith("cuda")
    return report


def test_cli_train_and_sweep_on_cuda(tmp_path):
    _train_on_cuda(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "sweep",
            str(tmp_path / "o" / "gated.pt"),
            "--data",
            "digits",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "sw"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert all(str(r["device"]).startswith("cuda") for r in rows)
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    want = "CUDAExecutionProvider" if has_cuda_ep else "CPUExecutionProvider"
    assert all(r["provider"] == want for r in rows)


def test_cli_train_in_bf16_on_cuda(tmp_path):
    report = _train_on_cuda(tmp_path, "--precision", "bf16")
    assert report["slim"]["test_accuracy"] > 0.5


def test_gated_lstm_trains_and_prunes_on_cuda():
    torch.manual_seed(0)
    net = build_model("lstm_rows", input_shape=(1, 28, 28), hidden=32, scheme="gal", p=0.2).cuda()
    compressdrop.attach(net, gate="lognormal")
    x, y = torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    (F.cross_entropy(net(x), y) + compressdrop.kl(net) / 100).backward()
    for _, g in compressdrop.named_gates(net):
        with torch.no_grad():
            g.log_sigma[::4] = 3.0
    net.eval()
    slim = compressdrop.prune(net)
    assert [m.hidden_size for m in slim.rnn] == [24, 24]
    with torch.no_grad():
        compressdrop.mask_(net)
        torch.testing.assert_close(slim(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_shared_gate_replays_its_draws_on_cuda(reentrant):
    """gates/_replay.py on a CUDA device: one θ at every site, the plain run's gradients under
    activation checkpointing, and the CUDA random stream left where it was."""
    from tests.test_shared_gate_draws import _gated

    model = _gated("lognormal").cuda()
    model.segments = "stem and first block"
    results = []
    for mode in (None, reentrant):
        model.reentrant = mode
        model.zero_grad()
        torch.manual_seed(1)
        x = torch.randn(4, 1, 6, 6, device="cuda", requires_grad=True)
        before = torch.cuda.get_rng_state()
        loss = model(x).square().mean() + compressdrop.kl(model) / 100
        loss.backward()
        # the only gate is the shared one: its sites drew from their own stream
        assert torch.equal(torch.cuda.get_rng_state(), before)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
