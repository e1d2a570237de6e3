"""Recurrent dropout and a pruned LSTM, end to end, on images read row by row.

    python examples/lstm_rows.py                      # digits (8 steps of 8 features), ~2 min
    python examples/lstm_rows.py --data fashion-mnist --epochs 6   # 28 steps of 28 features

1. trains a 2-layer LSTM with each recurrent dropout scheme and without dropout (or the one
   --scheme names) and reports test accuracy;
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


def fit(model, data, epochs, kl_weight=0.0, gate_lr=3e-2):
    # the gates' parameters need a larger step than the weights to move in a few epochs
    gate_params = {id(p) for _, g in cd.named_gates(model) for p in g.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_params]
    groups = [{"params": weights, "lr": 3e-3}]
    if gate_params:
        groups.append(
            {"params": [p for _, g in cd.named_gates(model) for p in g.parameters()], "lr": gate_lr}
        )
    opt = torch.optim.Adam(groups)
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
    ap.add_argument("--scheme", default="all", choices=(*SCHEMES, "all"))
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--beta", type=float, default=10.0, help="KL weight of the gated LSTM")
    ap.add_argument("--out", default="runs/lstm_rows.onnx")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset(args.data)

    schemes = SCHEMES if args.scheme == "all" else (args.scheme,)
    results = {}
    for scheme in schemes:
        p = 0.0 if scheme == "none" else args.p
        print(f"2-layer LSTM, recurrent dropout {scheme!r} p={p}")
        torch.manual_seed(0)
        net = build_model(
            "lstm_rows",
            input_shape=data.input_shape,
            hidden=64,
            layers=2,
            scheme=scheme,
            p=p,
            stacked=False,
        )
        fit(net, data, args.epochs)
        results[scheme] = evaluate(net, data.x_test, data.y_test).accuracy
    for scheme, acc in results.items():
        print(f"{scheme:>10s}: test acc {acc:.4f}")

    print("log-normal gates on each layer's hidden units")
    net = build_model("lstm_rows", input_shape=data.input_shape, hidden=64, layers=2)
    cd.attach(net, "lognormal")
    # β = 10: with β = 1 every unit's SNR was still above 2 after 10 epochs on digits (measured)
    fit(net, data, args.epochs, kl_weight=args.beta)
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
