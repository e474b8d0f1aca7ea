import pytest
import torch

import vita_engine


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and vita_engine.cuda_available()


CUDA_OK = _cuda_ok()


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of vita_engine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
