"""Learning works: each gate family, trained with the ELBO on digits, switches off a large share of
LeNet-300-100's hidden units, and the pruned net, fine-tuned as the shipped recipes do, keeps its
accuracy within 2 points of the same net trained without gates.

The shares and accuracies (before and after the fine-tune) are printed (pytest -s) and quoted in
the README."""

import pytest
import torch
import torch.nn.functional as F

import compressdrop as cd
from compressdrop.data import load_digits
from compressdrop.evaluation import evaluate
from compressdrop.gates import GATES
from compressdrop.models import build_model
from compressdrop.training import KLSchedule, Sparsifier

EPOCHS = 60
# The lenet300-* recipes' fine-tune stage: 5 epochs of Adam at 3e-4 on the pruned net.
FINETUNE_EPOCHS, FINETUNE_LR = 5, 3e-4
# Per-family gate learning rates: part of each method, as in the shipped recipes.
GATE_LR = {"lognormal": 1e-2, "variational": 3e-2, "concrete": 1e-2, "hardconcrete": 1e-2}


def _train(family: str | None, data, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("lenet300", data.input_shape)
    n = len(data.x_train)
    sp = (
        Sparsifier(model, n, gate=family, schedule=KLSchedule(beta=1.0, warmup=10))
        if family
        else None
    )
    fit(model, sp, data, EPOCHS, 1e-3, GATE_LR.get(family or "", 0.0), seed)
    return model, sp


def fit(model, sp, data, epochs: int, lr: float, gate_lr: float, seed: int = 0) -> None:
    """Adam on mini-batches of 64, the ELBO's KL term added when ``sp`` (a Sparsifier) is given."""
    n = len(data.x_train)
    groups = sp.param_groups(lr, gate_lr) if sp else model.parameters()
    opt = torch.optim.Adam(groups, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = (n + 63) // 64
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = perm[i * 64 : (i + 1) * 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if sp:
                loss = loss + sp.penalty(epoch + i / steps)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def dense_accuracy(digits):
    model, _ = _train(None, digits)
    return evaluate(model, digits.x_test, digits.y_test).accuracy


@pytest.mark.slow
@pytest.mark.parametrize("family", list(GATES))
def test_family_prunes_a_large_share_and_keeps_accuracy(family, digits, dense_accuracy):
    model, sp = _train(family, digits)
    kept, total = sp.units()
    share = 1 - kept / total
    gated_acc = evaluate(model, digits.x_test, digits.y_test).accuracy
    slim = sp.finish()
    pruned_acc = evaluate(slim, digits.x_test, digits.y_test).accuracy
    # Concrete gates do not converge to 0/1 in 60 epochs (keep probabilities spread over (0, 1)),
    # so cutting the units with SNR < 1 drops units that still carried E[θ] = q of their signal:
    # before the fine-tune, seeds 0-3 gave 95.3-96.2 % for concrete (the dense net: 97.6 %), and
    # the one-seed check without it passed or failed on the draw.
    fit(slim, None, digits, FINETUNE_EPOCHS, FINETUNE_LR, 0.0)
    slim_acc = evaluate(slim, digits.x_test, digits.y_test).accuracy
    print(
        f"\n{family}: {share:.1%} of hidden units below the default threshold "
        f"({slim.prune_report.architecture()}); test accuracy dense {dense_accuracy:.4f}, "
        f"gated {gated_acc:.4f}, pruned {pruned_acc:.4f}, fine-tuned {slim_acc:.4f}"
    )
    assert share >= 0.25, f"{family} pruned only {share:.1%}"
    assert slim_acc >= dense_accuracy - 0.02
    assert not cd.is_gated(slim)
