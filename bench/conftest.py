import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import vita_engine  # noqa: E402

CUDA_OK = torch.cuda.is_available() and vita_engine.cuda_available()
FULL = os.environ.get("VITA_BENCH_FULL") == "1"

DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU")


try:
    import nvtx  # optional: NVTX ranges around GPU launches for Nsight

    def nvtx_range(name):
        return nvtx.annotate(name)

except Exception:  # pragma: no cover
    import contextlib

    def nvtx_range(name):
        return contextlib.nullcontext()


@pytest.fixture
def sync():
    def _s(device):
        if device == "cuda":
            torch.cuda.synchronize()

    return _s
