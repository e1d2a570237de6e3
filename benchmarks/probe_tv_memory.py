"""Probe: memory a gated torchvision model keeps for its backward pass, against the same model
without gates, for each torchvision classification family of the test suite (one small model a
family, ``tests/torchvision_models.py``): the bytes of the distinct storages autograd's
saved-tensor hooks see in one training-mode forward pass, plus what the gates keep outside them
(``probe_hf_memory.kept_bytes``). Log-normal gates, random weights, ``--batch``
examples at each model's input side. Three gated columns: as shipped, with the BatchNorm fusion
off (``compressdrop/gates/_bn.py``), and with every hand-off and fusion off
(``compressdrop.gates.hand_overs_off``).

Run: python benchmarks/probe_tv_memory.py [--batch 32] [--noise example] [--out NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch
from probe_hf_memory import kept_bytes

import compressdrop as cd
from compressdrop.gates import _bn

from common import markdown_table, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.torchvision_models import families


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--noise", choices=("example", "batch"), default="example")
    ap.add_argument("--out", default="tv_memory")
    args = ap.parse_args()
    rows = []
    for name, (build, side) in families().items():
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, side, side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the layers left ungated, named in §7
            net = cd.attach(build(), "lognormal", example_inputs=x[:2],
                            gate_kwargs={"noise": args.noise}).train()  # fmt: skip
        plain = cd.detach(copy.deepcopy(net)).train()
        row = {"family": name, "plain MB": kept_bytes(plain, x) / 2**20}
        for column, switch in (
            ("gated", contextlib.nullcontext),
            ("BatchNorm fusion off", _bn.off),
            ("every hand-off off", cd.gates.hand_overs_off),
        ):
            torch.manual_seed(1)
            with switch():
                row[column] = kept_bytes(net, x) / 2**20 / row["plain MB"]
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(
        rows, ["family", "plain MB", "gated", "BatchNorm fusion off", "every hand-off off"]
    )
    print(table)
    print(save(args.out, {"args": vars(args), "rows": rows, "table": table}))


if __name__ == "__main__":
    main()
