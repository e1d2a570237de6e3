import contextlib
import os

import pytest
import torch

from compressdrop.gates import GATES

from tests.torchvision_models import import_torchvision

# torchvision (a test dependency) imports only after its missing ops are declared; do it before
# anything else imports it (torchmetrics does, under lightning): see tests/torchvision_models.py.
# Without torchvision (no dev extra) only tests/test_torchvision.py fails, on its import.
with contextlib.suppress(ModuleNotFoundError):
    import_torchvision()

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores, and so
# do the processes a test starts (the CLI runs): two workers each running torch on every core
# would fight over them and run slower than one.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = max(1, (cores or 1) // workers)
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=list(GATES.values()), ids=list(GATES))
def gate_cls(request):
    """Every gate family: the contract suite runs over each."""
    return request.param
