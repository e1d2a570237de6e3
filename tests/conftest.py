import contextlib

import pytest
import torch

from compressdrop.gates import GATES

from tests.torchvision_models import import_torchvision

# torchvision (a test dependency) imports only after its missing ops are declared; do it before
# anything else imports it (torchmetrics does, under lightning): see tests/torchvision_models.py.
# Without torchvision (no dev extra) only tests/test_torchvision.py fails, on its import.
with contextlib.suppress(ModuleNotFoundError):
    import_torchvision()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=list(GATES.values()), ids=list(GATES))
def gate_cls(request):
    """Every gate family: the contract suite runs over each."""
    return request.param
