"""pytest-benchmark suite: the cases of `vita-engine bench-kernels` (vita_engine.benchmarks), one
test per (device, case, dtype, impl). Works against the installed wheel or PYTHONPATH=python.

    pytest bench/ --benchmark-only --benchmark-group-by=group    (VITA_BENCH_FULL=1: every shape)
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU")
