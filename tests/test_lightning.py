"""The Lightning callback: a short fit on digits gives a slim model and a verified ONNX file."""

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import compressdrop as cd  # noqa: E402
from compressdrop.checkpoint import load_model  # noqa: E402
from compressdrop.data import load_digits  # noqa: E402
from compressdrop.evaluation.onnx_eval import evaluate_onnx  # noqa: E402
from compressdrop.integrations.lightning import CompressDropCallback  # noqa: E402
from compressdrop.models import build_model  # noqa: E402
from compressdrop.recipes import load_recipe  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = build_model("lenet300", input_shape=(1, 8, 8))
        self.added = []  # loss Lightning optimized minus the bare NLL: the KL term

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.nll = F.cross_entropy(self(x), y)
        return self.nll

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.added.append(float(outputs["loss"] - self.nll))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_callback_fits_prunes_and_exports(tmp_path):
    torch.manual_seed(0)
    data = load_digits()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True
    )
    recipe = load_recipe("lenet300-lognormal")
    recipe = recipe.replace(kl=type(recipe.kl)(beta=1.0, warmup=1.0))
    cb = CompressDropCallback(recipe, out_dir=tmp_path)
    module = Classifier()
    trainer = pl.Trainer(
        max_epochs=30,
        callbacks=[cb],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    assert cd.is_gated(module.model) and cb.num_train == len(data.x_train)
    assert cb.last_beta == pytest.approx(1.0)  # the warm-up ended
    # the scheduled KL term is in the loss Lightning optimized (β·KL/N > 0 after the warm-up)
    assert all(a > 0 for a in module.added[len(module.added) // 2 :])
    x = data.x_train[:64]
    module.eval()
    gated_acc = float((module(data.x_test).argmax(1) == data.y_test).float().mean())

    slim = cb.slim
    assert slim is not None and not cd.is_gated(slim)
    dense = build_model("lenet300", input_shape=(1, 8, 8))
    assert cd.size(slim, x).params < cd.size(dense, x).params  # units were removed
    slim_acc = float((slim(data.x_test).argmax(1) == data.y_test).float().mean())
    assert slim_acc > 0.8 and abs(slim_acc - gated_acc) < 0.05
    again = load_model(tmp_path / "slim.pt")
    torch.testing.assert_close(again(x), slim(x))
    res = evaluate_onnx(tmp_path / "slim.onnx", data.x_test, data.y_test)
    assert res["accuracy"] == pytest.approx(slim_acc, abs=1e-3)
    assert module.training_step.__func__ is Classifier.training_step  # unwrapped after fit


def test_callback_says_where_the_network_is_missing():
    cb = CompressDropCallback("lenet300-lognormal", target="net")
    with pytest.raises(AttributeError, match=r"no network at \.net"):
        cb.setup(None, Classifier(), "fit")


class OwnNet(Classifier):
    """A user's own network: no compressdrop factory names it."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)
        )


def test_callback_writes_the_slim_model_of_a_users_own_network(tmp_path):
    """Its end of fit raised "the model has no 'arch' record" and lost the slim model: the dense
    structure is now recorded as a torch.export program when the gates are attached."""
    torch.manual_seed(0)
    data = load_digits()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=128
    )
    cb = CompressDropCallback(
        "lenet300-lognormal", out_dir=tmp_path, example_input=data.x_train[:2]
    )
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(OwnNet(), loader)
    assert cb.slim is not None
    again = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(data.x_test[:16]), cb.slim.eval()(data.x_test[:16]))


def test_the_integration_imports_in_a_fresh_interpreter():
    """Lightning's metrics import torchvision, whose build may not match torch (this project's
    set-up): the import failed outside the test suite, whose conftest loads torchvision first."""
    import subprocess
    import sys

    code = "import compressdrop.integrations.lightning"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class OwnLM(pl.LightningModule):
    """A user's own Hugging Face decoder (tiny, random weights), trained on random token ids."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
        self.model = GPT2LMHeadModel(cfg)  # its config keeps use_cache on, as users' do

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_callback_records_a_decoder_with_its_cache_on_and_writes_slim_pt(tmp_path):
    """torch.export could not record this decoder's dense structure as it was (its output holds
    the key/value cache), so slim.pt2 was written in place of slim.pt; the record is now made
    with the cache off, at any length, and slim.pt rebuilds from it."""
    from compressdrop.checkpoint import load_model

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (32, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=16)
    cb = CompressDropCallback("gpt-lognormal", out_dir=tmp_path, example_input=ids[:2])
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(OwnLM(), loader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.onnx", "slim.pt"]
    rebuilt = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        for x in (ids[:2], ids[:3, :7]):  # another length too
            got, want = rebuilt(x), cb.slim.eval()(x).logits
            torch.testing.assert_close(got.logits if hasattr(got, "logits") else got, want)


def test_an_input_shape_it_cannot_infer_names_the_callbacks_argument(tmp_path):
    class Conv(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())

    callback = CompressDropCallback(load_recipe("lenet300-lognormal"), tmp_path)
    with pytest.raises(cd.CompressDropError, match=r"pass example_input=<"):
        callback.setup(None, Conv(), "fit")
