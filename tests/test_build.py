"""The compiled module: no torch link, static CUDA runtime, machine code for the promised archs."""
import glob
import os
import shutil
import subprocess

import pytest

import vita_engine


def _so():
    d = os.path.dirname(vita_engine.__file__)
    (path,) = glob.glob(os.path.join(d, "_C*.so"))
    return path


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import nvidia

        for base in nvidia.__path__:
            for cand in glob.glob(os.path.join(base, "*", "bin", "cuobjdump")):
                os.chmod(cand, 0o755)
                return cand
    except ImportError:
        pass
    return None


def test_no_torch_or_cuda_driver_link():
    if not shutil.which("readelf"):
        pytest.skip("readelf not installed")
    out = subprocess.run(["readelf", "-d", _so()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    for lib in needed:
        assert not lib.startswith(("libtorch", "libc10", "libcuda.", "libcudart")), needed


def test_import_without_gpu_reports_backends():
    assert isinstance(vita_engine.cuda_available(), bool)
    if vita_engine.built_with_cuda():
        assert vita_engine.cuda_arch_list(), "a CUDA build must report its architectures"
    else:
        assert vita_engine.cuda_arch_list() == []


def test_cuda_machine_code_present_for_each_arch():
    if not vita_engine.built_with_cuda():
        pytest.skip("CPU-only build")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not available (pip install nvidia-cuda-cuobjdump)")
    out = subprocess.run([exe, "--list-elf", _so()], capture_output=True, text=True, check=True).stdout
    for arch in vita_engine.cuda_arch_list():
        assert f".sm_{arch}.cubin" in out, (arch, out[:2000])
