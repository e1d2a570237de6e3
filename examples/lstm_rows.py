"""Recurrent dropout and a pruned LSTM, end to end, on images read row by row.

    python examples/lstm_rows.py                      # digits (8 steps of 8 features), ~1 min
    python examples/lstm_rows.py --data fashion-mnist --epochs 6   # 28 steps of 28 features

1. trains a 2-layer LSTM with the recurrent dropout scheme of your choice (--scheme);
2. attaches log-normal gates to the hidden units of a stacked LSTM, trains with the KL term,
   prunes the noisy units and exports the slim LSTM to ONNX (verified in onnxruntime).
The full comparison of schemes is benchmarks/bench_recurrent.py (results in BENCHMARKS.md).
"""

import argparse

import torch
import torch.nn.functional as F

import compressdrop as cd
from compressdrop.data import load_dataset
from compressdrop.dropout import SCHEMES
from compressdrop.evaluation import evaluate
from compressdrop.models import build_model


def fit(model, data, epochs, kl_weight=0.0):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    n = len(data.x_train)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(n).split(64):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if kl_weight:
                loss = loss + kl_weight * min(1.0, (epoch + 1) / 3) * cd.kl(model) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(
            f"  epoch {epoch + 1}: test acc {evaluate(model, data.x_test, data.y_test).accuracy:.4f}"
        )
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--scheme", default="gal", choices=SCHEMES)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="runs/lstm_rows.onnx")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset(args.data)

    print(f"2-layer LSTM, recurrent dropout {args.scheme!r} p={args.p}")
    net = build_model(
        "lstm_rows",
        input_shape=data.input_shape,
        hidden=64,
        layers=2,
        scheme=args.scheme,
        p=args.p,
        stacked=False,
    )
    fit(net, data, args.epochs)

    print("log-normal gates on each layer's hidden units")
    net = build_model("lstm_rows", input_shape=data.input_shape, hidden=64, layers=2)
    cd.attach(net, "lognormal")
    fit(net, data, args.epochs, kl_weight=1.0)
    slim = cd.prune(net)
    print(
        f"hidden units {slim.prune_report.architecture()}; "
        f"slim test acc {evaluate(slim, data.x_test, data.y_test).accuracy:.4f}"
    )
    rep = cd.export_onnx(slim, data.x_test[:2], args.out)
    print(
        f"wrote {rep.path} ({rep.bytes:,} bytes), onnxruntime max rel. error "
        f"{max(rep.max_rel_error.values()):.1e}"
    )


if __name__ == "__main__":
    main()
