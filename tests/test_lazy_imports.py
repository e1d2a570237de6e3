"""Heavy dependencies load where they are used: importing the pruning package does not import
Torch-Pruning, which comes in with the first pruner or dependency graph."""

import os
import subprocess
import sys

import pytest


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_importing_pruning_does_not_import_torch_pruning():
    _run("import compressdrop.pruning, sys; assert 'torch_pruning' not in sys.modules")


def test_the_lstm_pruner_is_built_on_first_access():
    _run(
        "import sys\n"
        "from compressdrop.gating import recurrent\n"
        "assert 'torch_pruning' not in sys.modules\n"
        "import torch_pruning as tp\n"
        "cls = recurrent.LSTMPruner\n"
        "assert issubclass(cls, tp.pruner.function.BasePruningFunc)\n"
        "assert cls is recurrent.LSTMPruner and cls.__qualname__ == 'LSTMPruner'\n"
        "from compressdrop.dropout import LSTM\n"
        "from compressdrop.gating.registry import customized_pruners\n"
        "pruner = customized_pruners()[LSTM]\n"
        "assert type(pruner) is cls and pruner.get_out_channels(LSTM(3, 5)) == 5\n"
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_importing_compressdrop_starts_no_thread():
    """A torch operation at import (the hard-concrete gate's default threshold was computed
    there) started torch's OpenMP threads, and a process forked after that import waited forever
    at its first parallel operation: tests/prewarmed.py's children did, at two threads."""
    _run(
        "import os, torch\n"
        "torch.set_num_threads(2)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "import compressdrop, compressdrop.cli, compressdrop.export, compressdrop.pruning\n"
        "import compressdrop.workflows, compressdrop.evaluation, compressdrop.uncertainty\n"
        "after = len(os.listdir('/proc/self/task'))\n"
        "assert after == before, f'{after - before} threads started by the imports'\n"
    )
