"""Run Python code in a subprocess where `import torch` fails, as on a machine without PyTorch."""
import os
import subprocess
import sys
from pathlib import Path

import vita_engine

NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(vita_engine.__file__).parents[1]),
                                                     os.environ.get("PYTHONPATH", "")]))
    env.pop("VITA_DEBUG", None)  # the one-line error, not the traceback
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, env=env,
                          timeout=120)
