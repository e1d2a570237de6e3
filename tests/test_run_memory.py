"""A run that trains a model brought to be pruned holds its weights once, not three times: the
run's template (the structure a resumed stage is rebuilt from) and the check of the gates' plan
before training each took a full copy of the model (a 405 MB decoder's `prune --data` peaked at
8.1× its weights, 6.5× since: BENCHMARKS.md §12). Both now share the model's tensors; the slim
model a run makes is the same to the bit."""

from __future__ import annotations

import copy

import torch

from compressdrop.data import load_digits
from compressdrop.models import build_model
from compressdrop.recipes import load_recipe
from compressdrop.training import runner, stages
from compressdrop.workflows.sparsify import sparsify_and_prune

RECIPE = "stages: {pretrain: {epochs: 0}, sparsify: {epochs: 1}, finetune: {epochs: 1}}\n"


def _prune(tmp_path):
    tmp_path.mkdir()
    (tmp_path / "r.yaml").write_text(RECIPE)
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 8, 8))
    ds = load_digits()
    slim = sparsify_and_prune(
        model, ds, load_recipe(str(tmp_path / "r.yaml")), device="cpu", work_dir=tmp_path
    )
    return model, slim


def test_the_template_and_the_plan_check_share_the_models_tensors(tmp_path, monkeypatch):
    copies: list[tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor], set, set]] = []
    share = stages.sharing_weights
    ids = lambda m: {id(t) for t in [*m.parameters(), *m.buffers()]}  # noqa: E731

    def spy(model):
        made = share(model)
        before = [t.clone() for t in model.state_dict().values()]
        copies.append((model, made, before, ids(model), ids(made)))
        return made

    monkeypatch.setattr(runner, "sharing_weights", spy)  # the template of the model brought
    monkeypatch.setattr(stages, "sharing_weights", spy)  # the copy the plan is checked on
    weights = {}

    def first_step(event):
        if event.get("event") == "stage" and event.get("stage") == "sparsify":
            template = copies[0][1]  # the model's tensors, in the dense structure
            weights["at sparsify"] = [t.clone() for t in template.state_dict().values()]

    (tmp_path / "r.yaml").write_text(RECIPE)
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 8, 8))
    sparsify_and_prune(
        model,
        load_digits(),
        load_recipe(str(tmp_path / "r.yaml")),
        device="cpu",
        work_dir=tmp_path,
        progress=first_step,
    )
    assert len(copies) == 2  # the template, then the check's copy of it
    (given, template, before, given_ids, template_ids), (source, checked, *_) = copies
    assert given is model and source is template
    assert template_ids == given_ids and len(given_ids) == 6  # the same tensors, no others
    assert template_ids < ids(checked)  # and the gated copy's own: its gates' parameters
    assert any(type(m).__name__ == "Gated" for m in checked.modules())  # the plan was attached
    assert not any(type(m).__name__ == "Gated" for m in template.modules())  # to a copy of it
    # the check changed no weight of the model before its first step
    assert all(torch.equal(a, b) for a, b in zip(before, weights["at sparsify"], strict=True))


def test_the_slim_model_is_the_same_as_with_full_copies(tmp_path, monkeypatch):
    _, shared = _prune(tmp_path / "shared")
    monkeypatch.setattr(runner, "sharing_weights", copy.deepcopy)
    monkeypatch.setattr(stages, "sharing_weights", copy.deepcopy)
    _, copied = _prune(tmp_path / "copied")
    a, b = shared.state_dict(), copied.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
