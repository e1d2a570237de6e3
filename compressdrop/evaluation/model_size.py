"""Model size: parameters, FLOPs (``torch.utils.flop_counter``) and ONNX bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["SizeReport", "count_flops", "count_gate_params", "count_params", "rnn_flops", "size"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_gate_params(model: nn.Module) -> int:
    """Number of the gates' parameters in ``model`` (each shared gate counted once): training
    state (μ, log σ, keep probabilities) that pruning folds into the weights, 0 for a plain or
    slim model. ``count_params(model) - count_gate_params(model)`` is the model's own size."""
    from ..gates import Gate

    seen = {id(p): p for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    return sum(p.numel() for p in seen.values())


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass per example, measured by ``FlopCounterMode`` at batch 1.

    As in ``torch.utils.flop_counter``: a multiply-add counts 2 FLOPs, and only matrix products and
    convolutions are counted (element-wise work is negligible beside them). PyTorch's fused
    recurrent kernels (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) have no FLOP formula there, so a
    recurrent module whose forward the counter saw as 0 FLOPs is counted here from its shapes.
    Attention is counted in full: the fused inference path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` (which the counter does not see into) is switched off while
    counting, and the CPU kernel of ``scaled_dot_product_attention`` gets the counter's formula
    for the other attention kernels (Q·Kᵀ and the weighted sum of V, causal or not).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    x = example_input[:1]
    extra = [0]
    counter = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    handles = []
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            handles.append(m.register_forward_pre_hook(_rnn_pre_hook(counter)))
            handles.append(m.register_forward_hook(_rnn_post_hook(counter, extra)))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        model.train(was)
    return int(counter.get_total_flops()) + extra[0]


def _attention_formulas() -> dict:
    """FLOP formulas the counter lacks: the CPU kernel of ``scaled_dot_product_attention``."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: sdpa_cpu} if op is not None else {}


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_flops(m: nn.RNNBase, steps: int) -> int:
    """FLOPs of ``steps`` time steps of one sequence: 2·G·H·(I + H) per step, layer and direction
    (G gates; the input of layers after the first is H·directions wide)."""
    gates, h = _GATES[m.mode], m.hidden_size
    dirs = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        i = m.input_size if layer == 0 else h * dirs
        out = m.proj_size or h  # with proj_size, the recurrent input is the projection
        per_step = 2 * gates * h * (i + out) + (2 * h * m.proj_size if m.proj_size else 0)
        total += dirs * steps * per_step
    return total


def _rnn_pre_hook(counter):
    def hook(m, args):
        m._cd_flops_before = counter.get_total_flops()

    return hook


def _rnn_post_hook(counter, extra):
    def hook(m, args, output):
        before = getattr(m, "_cd_flops_before", 0)
        if counter.get_total_flops() == before:  # the fused kernel: the counter saw nothing
            x = args[0]
            if isinstance(x, nn.utils.rnn.PackedSequence):
                steps = int(x.batch_sizes.numel())
            else:
                time_dim = 1 if (m.batch_first and x.dim() == 3) else 0
                steps = x.shape[time_dim]
            extra[0] += rnn_flops(m, int(steps))
        del m._cd_flops_before

    return hook


@dataclass(frozen=True)
class SizeReport:
    """Parameters, FLOPs per example and (for an exported model) bytes of the ONNX file."""

    params: int
    flops: int
    onnx_bytes: int | None = None

    def reduction_from(self, dense: SizeReport) -> dict[str, float]:
        """How many times smaller than ``dense`` this model is, per measure."""
        out = {
            "params": dense.params / max(self.params, 1),
            "flops": dense.flops / max(self.flops, 1),
        }
        if self.onnx_bytes and dense.onnx_bytes:
            out["onnx_bytes"] = dense.onnx_bytes / self.onnx_bytes
        return out


def size(
    model: nn.Module, example_input: torch.Tensor, onnx_path: str | Path | None = None
) -> SizeReport:
    """Parameters, FLOPs and, when ``onnx_path`` is given, its bytes on disk."""
    nbytes = os.path.getsize(onnx_path) if onnx_path is not None else None
    return SizeReport(count_params(model), count_flops(model, example_input), nbytes)
