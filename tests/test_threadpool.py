"""Where the CPU kernels run their parallel loops: on the OpenMP team torch already loaded (so our
threads never fight torch's spinning ones for the cores), else on the extension's own pool. Either
way the results are bit-identical, any number of Python threads may call at once, and the
extension never links an OpenMP runtime itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vita_engine
from vita_engine import _C

sys.path.insert(0, os.path.dirname(__file__))
from _no_torch import run_without_torch  # noqa: E402


def _openmp_loaded() -> bool:
    maps = Path("/proc/self/maps").read_text()
    return any(n in maps for n in ("/libgomp", "/libiomp", "/libomp"))


# Results of a few kernels whose parallel loops split differently (rows, time chunks x channel
# groups, attention items), with more work than one chunk so that several threads take part.
WORK = """
import torch, vita_engine
from vita_engine import ops
g = torch.Generator().manual_seed(7)
x = torch.randn(300, 3584, generator=g); w = torch.randn(3584, generator=g)
cx = torch.randn(2, 64, 97, generator=g); cw = torch.randn(64, 32, 11, generator=g); cb = torch.randn(32, generator=g)
ids = torch.randint(0, 500, (300,), generator=g); emb = torch.randn(500, 256, generator=g)
q = torch.randn(6, 8, 64, generator=g); kc = torch.randn(40, 16, 2, 64, generator=g); vc = torch.randn(40, 16, 2, 64, generator=g)
bt = torch.arange(36, dtype=torch.int32).view(6, 6); sl = torch.tensor([96, 1, 17, 50, 80, 33], dtype=torch.int32)
cu = torch.arange(7, dtype=torch.int32)
RESULTS = {
    "rms_norm": ops.rms_norm(x, w),
    "conv_transpose1d": ops.conv_transpose1d(cx, cw, cb, stride=5, padding=3, lrelu_slope=0.1),
    "fuse_embeddings": ops.fuse_embeddings(ids, emb),
    "paged_attention": ops.paged_attention(q, kc, vc, bt, sl, cu, scale=0.125),
}
"""


def _run(code: str, threads: int, backend: str = "omp", timeout: float = 300) -> str:
    """Runs code in a fresh interpreter with VITA_NUM_THREADS=threads (and VITA_THREADPOOL=own for
    the own pool); returns its last line of output."""
    env = dict(os.environ, VITA_NUM_THREADS=str(threads))
    env.pop("VITA_THREADPOOL", None)
    if backend == "own":
        env["VITA_THREADPOOL"] = "own"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vita_engine.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def _results_in_subprocess(tmp_path, threads, backend="omp"):
    out = tmp_path / "r.pt"
    code = WORK + f"torch.save(RESULTS, {str(out)!r}); print(vita_engine._C.threadpool_backend())"
    return _run(code, threads, backend), torch.load(out)


def test_backend_is_torchs_openmp_team_when_loaded():
    assert _C.threadpool_backend() == ("omp" if _openmp_loaded() else "own")


def test_own_pool_and_openmp_team_give_identical_results(tmp_path):
    if not _openmp_loaded():
        pytest.skip("this torch build loads no OpenMP runtime")
    b_omp, r_omp = _results_in_subprocess(tmp_path, 3)
    b_own, r_own = _results_in_subprocess(tmp_path, 3, "own")
    b_one, r_one = _results_in_subprocess(tmp_path, 1)
    assert (b_omp, b_own) == ("omp", "own")
    for k in r_omp:
        assert torch.equal(r_omp[k], r_own[k]), k
        # One thread runs the same chunks in order: a kernel whose answer depended on which
        # thread ran a chunk would differ here.
        assert torch.equal(r_omp[k], r_one[k]), k


@pytest.mark.parametrize("backend", ["omp", "own"])
def test_many_python_threads_at_once(tmp_path, backend):
    """Each Python thread gets its own OpenMP team (or, on the own pool, the caller runs inline
    while another holds the pool); answers must equal the serial ones."""
    code = WORK + """
import threading
serial = {k: v.clone() for k, v in RESULTS.items()}
errors = []
def worker():
    try:
        for _ in range(15):
            assert torch.equal(ops.rms_norm(x, w), serial["rms_norm"])
            assert torch.equal(ops.conv_transpose1d(cx, cw, cb, stride=5, padding=3, lrelu_slope=0.1), serial["conv_transpose1d"])
            assert torch.equal(ops.paged_attention(q, kc, vc, bt, sl, cu, scale=0.125), serial["paged_attention"])
    except BaseException as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker) for _ in range(4)]
[t.start() for t in ts]; [t.join(120) for t in ts]
assert not errors, errors
assert not any(t.is_alive() for t in ts)
print(vita_engine._C.threadpool_backend())
"""
    assert _run(code, 2, backend) == (backend if _openmp_loaded() else "own")


def test_own_pool_without_torch():
    r = run_without_torch("""
import numpy as np, vita_engine
x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32); w = np.ones(1024, np.float32)
y = np.empty_like(x)
for _ in range(3):
    vita_engine._C.rms_norm(x, w, y, 1e-6)
ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
assert np.allclose(y, ref, atol=1e-5), abs(y - ref).max()
print(vita_engine._C.threadpool_backend())
""")
    assert r.returncode == 0 and r.stdout.strip() == "own", r.stderr


def test_extension_links_no_openmp_runtime():
    if not shutil.which("readelf"):
        pytest.skip("readelf not installed")
    so = next(Path(vita_engine.__file__).parent.glob("_C*.so"))
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert not [n for n in needed if "omp" in n], needed


@pytest.mark.parametrize("backend", ["omp", "own"])
def test_kernels_in_a_forked_child(backend):
    """GNU OpenMP hangs in a child forked after the parent ran a parallel region; the kernels must
    not (a forked child runs them without the host team)."""
    code = """
import os, torch, vita_engine
from vita_engine import ops
x = torch.randn(512, 3584); w = torch.randn(3584)
y0 = ops.rms_norm(x, w).numpy().copy()
torch.mm(x[:64], x[:64].T)
pid = os.fork()
if pid == 0:
    y = ops.rms_norm(x, w).numpy()  # no torch op here: torch's own would hang on libgomp
    os._exit(0 if (y == y0).all() else 3)
_, st = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(st))
"""
    assert _run(code, 2, backend, timeout=60) == "0"
