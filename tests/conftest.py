import pytest
import torch

from compressdrop.gates import GATES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=list(GATES.values()), ids=list(GATES))
def gate_cls(request):
    """Every gate family: the contract suite runs over each."""
    return request.param
