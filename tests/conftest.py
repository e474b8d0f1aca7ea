import os

import pytest
import torch

import vita_engine

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random VITA-1.5 checkpoint in the real layout (written once per session)."""
    from vita_engine.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "VITA-1.5", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    import warnings

    from vita_engine import VitaModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VitaModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


def max_errs(a, b):
    """(max abs error, max abs error / max |b|) in float64."""
    a, b = a.double(), b.double()
    d = (a - b).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-30)
