"""The package declares what it imports: [project] dependencies cover every third-party import of
python/vita_engine, the `test` extra every import of tests/ and bench/, requirements-test.txt is the
two together; without torch, `import vita_engine` and `_C` work and the torch parts say what to do."""
import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import vita_engine

from _no_torch import run_without_torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# imported by the package, deliberately not declared: each import is guarded and says what to do
OPTIONAL = {
    "nvtx": "NVTX ranges fall back to torch.cuda.nvtx",
    "matplotlib": "only `bench --plot`, which names the package when it is missing",
}
# Imported only by the subpackage of an extra (declared in it, never imported by the rest of the package).
EXTRAS = {"ray": ("ray", "vita_engine/serving/ray.py")}  # module -> (extra, the only files importing it)
# Optional features: the modules of an extra may be imported (at any level) only inside its folder,
# which the rest of the package imports lazily, after checking the extra is installed.
EXTRA_FOLDERS = {"webrtc": "python/vita_engine/server/webrtc"}
# Imported by the package only on paths that run under the test extra.
RUNTIME_OPTIONAL = dict(OPTIONAL, pytest="only benchmarks/suite.py's pytest_params, called while pytest collects bench/",
                        **{m: f"the [{x}] extra" for m, (x, _) in EXTRAS.items()})


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _third_party_imports(folder: Path, *also_local: Path):
    """{top-level module: [files]} of absolute imports that are neither stdlib nor local files."""
    # sibling modules the folder's own files import by name (tests' helpers; bench/ scripts use them
    # too: `also_local`); not every file's stem: vita_engine/serving/ray.py must not hide `ray`
    local = {p.stem for f in (folder, *also_local) for p in f.glob("*.py")} | {"vita_engine"}
    found = {}
    for f in folder.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
            for m in names:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, []).append(str(f.relative_to(ROOT)))
    return found


def _unprovided(imports, declared):
    """Imports that no declared distribution provides (as the installed distributions say)."""
    provides = metadata.packages_distributions()
    bad = {}
    for mod, files in imports.items():
        dists = {_norm(d) for d in provides.get(mod, [])}
        if not dists & declared:
            bad[mod] = (sorted(dists) or "not installed", sorted(set(files))[:3])
    return bad


def test_runtime_imports_are_declared():
    proj = _pyproject()
    declared = {_req_name(r) for r in proj["dependencies"]}
    imports = _third_party_imports(ROOT / "python" / "vita_engine")
    assert {"torch", "safetensors", "yaml", "tokenizers", "silero_vad"} <= set(imports)  # the scan sees them
    for extra, folder in EXTRA_FOLDERS.items():
        in_extra = {_req_name(r) for r in proj["optional-dependencies"][extra]}
        mine = {m: f for m, f in imports.items() if all(x.startswith(folder + "/") for x in f)}
        bad = _unprovided({m: f for m, f in mine.items() if m not in RUNTIME_OPTIONAL}, declared | in_extra)
        assert not bad, f"imported under {folder} but in neither the dependencies nor the {extra!r} extra: {bad}"
        imports = {m: f for m, f in imports.items() if m not in mine}
    bad = _unprovided({m: f for m, f in imports.items() if m not in RUNTIME_OPTIONAL}, declared)
    assert not bad, f"imported at run time but not in [project] dependencies: {bad}"


def test_extra_imports_stay_in_their_subpackage_and_are_declared():
    """`ray` is imported by vita_engine/serving/ray.py alone (`vita-engine serve` without --ray,
    and `import vita_engine.serving`, never import it), and the extra declares it."""
    proj = _pyproject()
    imports = _third_party_imports(ROOT / "python" / "vita_engine")
    for mod, (extra, files) in EXTRAS.items():
        got = sorted(set(imports.get(mod, [])))
        assert got == [f"python/{files}"], (mod, got)
        declared = {_req_name(r) for r in proj["optional-dependencies"][extra]}
        assert not _unprovided({mod: got}, declared), (mod, extra)
    r = subprocess.run([sys.executable, "-c", "import sys, vita_engine.cli, vita_engine.serving, vita_engine.serving.core, "
                        "vita_engine.server; assert 'ray' not in sys.modules; print('ok')"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(vita_engine.__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH", "")])))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_extras_are_in_the_test_extra():
    proj = _pyproject()
    test = {re.sub(r"\s+", "", r) for r in proj["optional-dependencies"]["test"]}
    for extra in EXTRA_FOLDERS:
        assert set(proj["optional-dependencies"][extra]) <= test, extra


def test_optional_imports_stay_inside_functions():
    for f in (ROOT / "python" / "vita_engine").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for n in tree.body:  # module level only
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            assert not {m.split(".")[0] for m in names} & set(OPTIONAL), f"{f}: optional module imported at top level"


def test_test_suite_imports_are_in_test_extra():
    proj = _pyproject()
    declared = {_req_name(r) for r in proj["dependencies"] + proj["optional-dependencies"]["test"]}
    for folder in ("tests", "bench"):
        imports = {m: f for m, f in _third_party_imports(ROOT / folder, ROOT / "tests").items() if m not in OPTIONAL}
        assert "pytest" in imports
        bad = _unprovided(imports, declared)
        assert not bad, f"{folder}/ imports these, but neither the dependencies nor the test extra list them: {bad}"


def test_requirements_test_txt_is_dependencies_plus_test_extra():
    proj = _pyproject()
    lines = [ln.strip() for ln in (ROOT / "requirements-test.txt").read_text().splitlines()]
    got = sorted(re.sub(r"\s+", "", ln) for ln in lines if ln and not ln.startswith("#"))
    want = sorted(re.sub(r"\s+", "", r) for r in proj["dependencies"] + proj["optional-dependencies"]["test"])
    assert got == want


def test_installed_wheel_metadata_matches_pyproject():
    """Against the installed wheel (scripts/test.sh): its Requires-Dist is today's pyproject."""
    if "site-packages" not in vita_engine.__file__:
        pytest.skip("vita_engine is imported from the source tree, not from an installed wheel")
    reqs = metadata.requires("vita-engine") or []
    core = sorted(_req_name(r) for r in reqs if "extra ==" not in r)
    assert core == sorted(_req_name(r) for r in _pyproject()["dependencies"])


# ---- without torch -------------------------------------------------------------------------------


HINT = 'needs PyTorch (torch>=2.4), which is not installed: pip install "vita-engine[torch]"'


def test_kernels_with_numpy_need_no_torch():
    r = run_without_torch("""
import numpy as np, vita_engine
x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32); w = np.ones(64, np.float32)
y = np.empty_like(x)
vita_engine._C.rms_norm(x, w, y, 1e-6)
ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
assert np.allclose(y, ref, atol=1e-5), abs(y - ref).max()
assert "torch" not in sys.modules
print("ok")
""")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("stmt, what", [
    ("vita_engine.VitaModel", "vita_engine.VitaModel"),
    ("vita_engine.Engine", "vita_engine.Engine"),
    ("vita_engine.ops", "vita_engine.ops"),
    ("__import__('vita_engine.runtime', fromlist=['Engine']).Engine", "vita_engine.runtime"),
    ("__import__('vita_engine.model.loading', fromlist=['load_codec']).load_codec", "vita_engine.model"),
    ("__import__('vita_engine.testing').testing", "vita_engine.testing"),
])
def test_torch_parts_say_how_to_get_torch(stmt, what):
    r = run_without_torch(f"""
import vita_engine
try:
    {stmt}
except ModuleNotFoundError as e:
    assert e.name == "torch", e.name
    print(e)
else:
    print("no error")
""")
    assert r.returncode == 0 and r.stdout.strip() == f"{what} {HINT}", (r.stdout, r.stderr)
