"""Bayesian pruning inside your own training loop, in a few lines.

Run: .venv/bin/python examples/custom_loop.py   (about 20 s on two idle CPU cores)
"""

import torch
import torch.nn.functional as F

import compressdrop as cd
from compressdrop.data import load_digits
from compressdrop.evaluation import count_flops, evaluate
from compressdrop.models import build_model
from compressdrop.training import KLSchedule, Sparsifier

torch.manual_seed(0)
data = load_digits()
train, val = data.split_validation(0.1)
model = build_model("lenet300", data.input_shape)  # or any nn.Module of yours

# 1. attach log-normal gates; the KL term is scaled by the data-set size and warmed up over 10 epochs
sp = Sparsifier(
    model, n_train=len(train.x_train), gate="lognormal", schedule=KLSchedule(beta=1.0, warmup=10)
)
opt = torch.optim.Adam(sp.param_groups(lr=1e-3, gate_lr=1e-2))

# 2. your loop, with one extra term in the loss
epochs, batch = 60, 64
for epoch in range(epochs):
    model.train()
    perm = torch.randperm(len(train.x_train))
    steps = (len(perm) + batch - 1) // batch
    for i in range(steps):
        idx = perm[i * batch : (i + 1) * batch]
        loss = F.cross_entropy(model(train.x_train[idx]), train.y_train[idx]) + sp.penalty(
            epoch + i / steps
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    if (epoch + 1) % 20 == 0:
        kept, total = sp.units()
        print(
            f"epoch {epoch + 1}: val acc {evaluate(model, val.x_test, val.y_test).accuracy:.3f}, "
            f"units kept {kept}/{total}"
        )

# 3. prune: a plain, smaller nn.Module (new parameters: build a new optimizer to fine-tune it)
slim = sp.finish()
x = data.x_test[:1]
print("architecture", slim.prune_report.architecture())
print(
    f"test accuracy {evaluate(slim, data.x_test, data.y_test).accuracy:.4f}, "
    f"FLOPs {count_flops(build_model('lenet300', data.input_shape), x):,} → {count_flops(slim, x):,}"
)

# 4. export to ONNX, checked in onnxruntime
report = cd.export_onnx(slim, data.x_test[:2], "slim.onnx")
print(f"wrote slim.onnx ({report.bytes:,} bytes, {report.provider})")
