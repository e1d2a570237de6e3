"""What running a loaded program's graph will allocate, found before it runs: the graph is run
once on fake tensors (shapes and dtypes, no memory), every operator's outputs counted.

The sizes a ``.pt2`` file declares for its nodes are not what the nodes make (a node
``aten.ones([30000, 30000])`` declared ``[1, 4]``: 3.8 GB in ``load_model``), so nothing here
reads them. An operator's own workspace is not among its outputs: a convolution that the CPU
runs through im2col (float64, where oneDNN does not take it) made a buffer of batch × input
channels × kernel × output positions (424 MiB for one float64 ``Conv2d(1, 1, 31)`` on 200 × 200),
so the largest convolution's is added as such a bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import CheckpointError, prefixed

__all__ = ["check_run_bound", "too_big_to_run"]

#: what a run at load may allocate: 64 times the weights' bytes plus 256 MB. Every tensor of a
#: forward pass, all kept, comes to 2.2 times its weights for ResNet-18 at batch 3 and 3.4 for
#: ViT-B/16: these pass exported at a batch of 50 or more, small nets by the fixed part. A graph
#: that asks for more (a 13 KB file made ``aten.ones([45000, 45000])``, 8 GB, at load) is not
#: run to be judged.
_RUN_PER_WEIGHT_BYTE, _RUN_FIXED_BYTES = 64, 256 << 20

Spec = tuple[Sequence[int], torch.dtype]
# the convolution operators (conv2d, convolution, _slow_conv2d_forward, mkldnn_convolution, ...),
# not convert_element_type
_CONV = re.compile(r"(^|_)conv(?!ert)")


def too_big_to_run(gm: nn.Module, inputs: Sequence[Spec]) -> str:
    """Why the graph is not run on inputs of these shapes and dtypes, or "" if it may be: the
    bytes of every tensor its operators make (:func:`_made_bytes`) against
    :data:`_RUN_PER_WEIGHT_BYTE` times its weights plus :data:`_RUN_FIXED_BYTES`."""
    total = _made_bytes(gm, inputs)
    if isinstance(total, str):
        return total
    weights = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    budget = _RUN_PER_WEIGHT_BYTE * weights + _RUN_FIXED_BYTES
    if total <= budget:
        return ""
    batch = inputs[0][0][0] if inputs and inputs[0][0] else 1
    return (
        f"its graph's tensors come to {total / 2**20:,.0f} MiB at batch size {batch}, over the "
        f"{budget / 2**20:,.0f} MiB allowed for it: {_RUN_PER_WEIGHT_BYTE} times its weights "
        f"plus {_RUN_FIXED_BYTES >> 20} MiB"
    )


def check_run_bound(gm: nn.Module, inputs: Sequence[torch.Tensor], where: str) -> None:
    """Refuse to run ``gm`` on ``inputs`` at load (a gated file's gates are attached by tracing
    its program) where :func:`too_big_to_run` says why.

    Raises:
        CheckpointError: naming ``where`` and the reason.
    """
    with prefixed(where):
        why = too_big_to_run(gm, [(tuple(x.shape), x.dtype) for x in inputs])
    if why:
        raise CheckpointError(f"{where}: its program is not run to attach the gates: {why}")


class _Tally(TorchDispatchMode):
    """Sums the bytes of every tensor the operators under it return (a fake tensor's: none is
    allocated), those inside ``cond``'s two branches and the grad-mode and autocast wrappers'
    bodies too, and keeps the largest convolution workspace (:func:`_workspace`); any other
    higher-order operator (``map``, ``scan``, ``flex_attention``) is not measured
    (:class:`NotImplementedError`)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.workspace = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if isinstance(func, torch._ops.HigherOrderOperator):
            return self._branches(func.name(), args)
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.numel() * t.element_size() for t in _leaves(out))
        if _CONV.search(func.__name__):
            self.workspace = max(self.workspace, _workspace(func.__name__, args, out))
        return out

    def _branches(self, name: str, args: Any) -> Any:
        """A higher-order operator's subgraphs run under this tally; its output, one of theirs."""
        with self:
            if name == "cond":
                _, true_fn, false_fn, operands = args
                false_fn(*operands)
                return true_fn(*operands)
            if name == "wrap_with_set_grad_enabled":
                with torch.set_grad_enabled(bool(args[0])):
                    return args[1](*args[2:])
            if name == "wrap_with_autocast":  # its dtypes taken as the body's own: no fewer bytes
                return args[4](*args[5:])
        raise NotImplementedError(f"the sizes inside {name} are not measured")


def _workspace(name: str, args: Any, out: Any) -> int:
    """A bound on a convolution's im2col buffer: batch × the larger channel count × kernel size
    × its output positions (its input's, transposed), in its dtype (0 for anything else)."""
    outs = _leaves(out)
    if len(args) < 2 or not outs or not all(isinstance(a, torch.Tensor) for a in args[:2]):
        return 0
    x, w, y = args[0], args[1], outs[0]
    if x.dim() < 3 or w.dim() != x.dim() or y.dim() != x.dim():
        return 0
    channels = max(x.shape[1], y.shape[1], w.shape[0], w.shape[1])
    transposed = "transpose" in name or (len(args) > 6 and args[6] is True)
    positions = math.prod((x if transposed else y).shape[2:])
    return x.shape[0] * channels * math.prod(w.shape[2:]) * positions * x.element_size()


def _made_bytes(gm: nn.Module, inputs: Sequence[Spec]) -> int | str:
    """The bytes of every tensor ``gm`` makes from inputs of these shapes and dtypes (those
    inputs included), all kept, plus the largest convolution workspace, found on fake tensors,
    or why they cannot be known before it runs (an operator whose output's size the data
    decides, or one the fake tensors do not implement)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            fakes = [torch.empty(tuple(shape), dtype=dtype) for shape, dtype in inputs]
            with _Tally() as tally:
                gm(*fakes)
    except CheckpointError:  # a checked operator's shapes disagree (._checked): refused
        raise
    except Exception as e:  # any other failure of the fake run: its sizes are not known
        return f"the sizes of its tensors are not known before it runs ({type(e).__name__})"
    given = sum(x.numel() * x.element_size() for x in fakes)
    return tally.total + tally.workspace + given


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
