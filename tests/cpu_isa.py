"""The `isa` fixture of the CPU kernel tests: each test that takes it runs on every CPU build of the
kernel the machine has (AVX2, AVX-512), chosen through VITA_CPU_ISA; builds the CPU lacks are skipped,
and on a CUDA `device` parameter it runs once (the ISA choice only applies to the CPU kernels)."""
import pytest

import vita_engine

ISA_ORDER = {"avx2": 0, "avx512": 1, "avx512bf16": 2, "amx": 3}


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device", "cpu") != "cpu":
        if request.param != "avx2":
            pytest.skip("the ISA choice only applies to the CPU kernels")
        return request.param
    monkeypatch.delenv("VITA_CPU_ISA", raising=False)
    best = vita_engine._C.cpu_isa()
    if ISA_ORDER[request.param] > ISA_ORDER[best]:
        pytest.skip(f"this CPU has no {request.param} (best: {best})")
    monkeypatch.setenv("VITA_CPU_ISA", request.param)
    assert vita_engine._C.cpu_isa() == request.param
    return request.param
