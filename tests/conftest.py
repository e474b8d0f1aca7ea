import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
