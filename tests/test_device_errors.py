"""A GPU that cannot be used is reported with its real cause, in one line (CuPy faked in a fresh interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A stand-in `cupy` package: importing it fails, or its runtime raises as CuPy does on a bad driver.
FAKE_CUPY = {
    "driver": (
        "class CUDARuntimeError(RuntimeError):\n    pass\n"
        "class _Runtime:\n"
        "    @staticmethod\n"
        "    def getDeviceCount():\n"
        "        raise CUDARuntimeError('cudaErrorInsufficientDriver: CUDA driver version is insufficient for '\n"
        "                               'CUDA runtime version')\n"
        "class cuda:\n    runtime = _Runtime\n"
        "ndarray = type('ndarray', (), {})\n"
    ),
    "libraries": "raise ImportError('libcudart.so.12: cannot open shared object file: No such file or directory')\n",
}
CAUSE = {"driver": "cudaErrorInsufficientDriver", "libraries": "libcudart.so.12"}


def run_with_fake_cupy(tmp_path, kind, *argv):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(FAKE_CUPY[kind])
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MINIGPT_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["driver", "libraries"])
def test_the_cause_is_named(tmp_path, kind):
    probe = "from minigpt.autograd import backend; print(backend.cuda_available(), backend.cuda_unavailable_reason())"
    out = run_with_fake_cupy(tmp_path, kind, "-c", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ") and CAUSE[kind] in out.stdout and "pip install" not in out.stdout


@pytest.mark.parametrize("script", ["train_gpt.py", "bench_train.py"])
def test_scripts_say_it_in_one_line(tmp_path, script):
    out = run_with_fake_cupy(tmp_path, "driver", str(ROOT / "scripts" / script), "--device", "cuda")
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and CAUSE["driver"] in err
