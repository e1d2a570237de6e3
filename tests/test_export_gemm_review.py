"""Review of the Gemm export (``compressdrop/export/_gemm.py``): a stock linear layer keeps
``nn.Linear``'s call signature while it is switched, so that a model that passes the input by
keyword exports as one that passes it by position."""

import collections

import onnx
import torch
from torch import nn

from compressdrop.export import export_onnx
from compressdrop.export._gemm import gemm_linears


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


class _Block(nn.Module):
    """A linear layer, then a stock attention; ``by_keyword``: the layer called as
    ``fc(input=x)``, which ``nn.Linear.forward(self, input)`` takes."""

    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.fc = nn.Linear(8, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(input=x) if self.by_keyword else self.fc(x)
        return self.att(h, h, h, need_weights=False)[0]


def test_a_switched_layer_takes_its_input_by_keyword():
    fc = nn.Linear(8, 4)
    x = torch.randn(2, 3, 8)
    with gemm_linears(fc):
        got = fc(input=x)  # TypeError: forward() got an unexpected keyword argument 'input'
    torch.testing.assert_close(got, nn.functional.linear(x, fc.weight, fc.bias))


def test_a_keyword_call_exports_the_graph_of_a_positional_one(tmp_path):
    """The keyword call failed the first export; the retry as the model is then dropped the
    spelled-out attention as well as the Gemms (8 Transposes instead of 4)."""
    x = torch.randn(3, 5, 8)
    graphs = []
    for by_keyword in (False, True):
        torch.manual_seed(0)
        export_onnx(_Block(by_keyword).eval(), x, tmp_path / f"{by_keyword}.onnx")
        graphs.append(_ops(tmp_path / f"{by_keyword}.onnx"))
    assert graphs[1] == graphs[0]
    assert graphs[0]["Gemm"] == 3  # fc, q/k/v in one product, out_proj
