"""kernels_cuda on machines without CuPy or a GPU: importing it is harmless, calling a kernel fails clearly,
the switch works, and the NumPy path never reaches a kernel. (The kernels themselves: tests/gpu/.)"""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigpt
from minigpt import functional as F
from minigpt.autograd import kernels_cuda
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW

KERNEL_FUNCTIONS = kernels_cuda.KERNEL_FUNCTIONS


def test_import_without_cupy_then_a_kernel_call_names_what_is_missing():
    # A fresh interpreter in which `import cupy` fails, so this holds on GPU machines too.
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np\n"
        "import minigpt.autograd.kernels_cuda as k\n"
        "try:\n"
        "    k.gelu_forward(np.ones(3, dtype=np.float32))\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout
    assert "needs CuPy and an NVIDIA GPU" in out


def test_the_module_imports_cupy_only_through_the_backend():
    tree = ast.parse(Path(kernels_cuda.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("cupy", "cupyx")]


def test_switch_and_dtypes(monkeypatch):
    monkeypatch.delenv(kernels_cuda.DISABLE_ENV, raising=False)
    assert kernels_cuda.enabled(np.dtype(np.float32)) and kernels_cuda.enabled(np.dtype(np.float64))
    assert not kernels_cuda.enabled(np.dtype(np.float16)) and not kernels_cuda.enabled(np.dtype(np.int64))
    monkeypatch.setenv(kernels_cuda.DISABLE_ENV, "1")
    assert not kernels_cuda.enabled(np.dtype(np.float32))
    monkeypatch.setenv(kernels_cuda.DISABLE_ENV, "0")
    assert kernels_cuda.enabled(np.dtype(np.float32))


def test_block_size_is_a_power_of_two_between_a_warp_and_256():
    sizes = {n: kernels_cuda._block_size(n) for n in (0, 1, 7, 32, 33, 255, 256, 257, 50304)}
    assert sizes == {0: 32, 1: 32, 7: 32, 32: 32, 33: 64, 255: 256, 256: 256, 257: 256, 50304: 256}


def test_numpy_arrays_never_reach_a_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called on the CPU path")

    for name in KERNEL_FUNCTIONS:
        monkeypatch.setattr(kernels_cuda, name, refuse)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), rng=np.random.default_rng(0))
    opt = AdamW(model.parameters(), lr=1e-3)
    ids = np.random.default_rng(1).integers(0, 11, size=(2, 8))
    _, loss = model(ids, ids)
    loss.backward()
    opt.step()
    x = minigpt.tensor(np.ones((2, 4), dtype=np.float32), requires_grad=True)
    F.gelu(x).sum().backward()
    assert np.isfinite(loss.item())


@pytest.mark.parametrize("name", KERNEL_FUNCTIONS)
def test_every_kernel_function_exists(name):
    assert callable(getattr(kernels_cuda, name))
