"""Device kernels: where an op's compiled forms register, and the one place they are chosen.

An op's `forward`/`backward` array code (against `xp`) is its maths and its reference. A kernel for
a device is a subclass of the op that overrides its forward and backward (or the row-level steps an
op exposes) with compiled code: Numba for NumPy arrays (kernels_cpu.py), CuPy for CuPy arrays
(kernels_cuda.py). An array-level function such as the AdamW update registers a compiled twin the
same way. `Function.apply` and the optimizers call `implementation(op, array)`, which picks by the
array's device and dtype; nothing else in the engine branches on kernels.

Kernel modules load on first use (Numba's import and the kernels' compilation cost time that a
model on the GPU, or a user who only imports minigpt, should not pay). Switches, read at every
choice so tests and benchmarks can flip them: MINIGPT_NO_CPU_KERNELS=1, MINIGPT_NO_CUDA_KERNELS=1.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

SWITCHES = {"cpu": "MINIGPT_NO_CPU_KERNELS", "cuda": "MINIGPT_NO_CUDA_KERNELS"}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_MODULES = {"cpu": "minigpt.autograd.kernels_cpu", "cuda": "minigpt.autograd.kernels_cuda"}

_registry: dict[tuple[Any, str], Any] = {}
_loaded: dict[str, bool] = {}


def register(op: Any, device: str) -> Callable[[Any], Any]:
    """Class (or function) decorator: the kernel form of `op` for `device` ("cpu" or "cuda"), float32/64."""

    def decorate(kernel: Any) -> Any:
        _registry[(op, device)] = kernel
        return kernel

    return decorate


def enabled(device: str) -> bool:
    """Whether `device`'s kernels are switched on (its MINIGPT_NO_*_KERNELS is unset, empty or 0)."""
    return not _switched_off(device) and _load(device)


def implementation(op: Any, array: Any, default: Any = None) -> Any:
    """The kernel registered for `op` on `array`'s device and dtype, else the array code: `default`
    (for an op registered by name) or `op` itself (an op class)."""
    device = "cpu" if isinstance(array, np.ndarray) else "cuda"
    if device not in _loaded and array.dtype in FLOAT_DTYPES and not _switched_off(device):
        _load(device)
    kernel = _registry.get((op, device))
    # The switch is read only for ops that have a kernel: most ops run per call under no_grad (generation).
    if kernel is None or array.dtype not in FLOAT_DTYPES or _switched_off(device):
        return op if default is None else default
    return kernel


def _switched_off(device: str) -> bool:
    return os.environ.get(SWITCHES[device], "") not in ("", "0")


def _load(device: str) -> bool:
    """Import the device's kernel module once; without Numba, say so once and run the array code."""
    if device not in _loaded:
        try:
            importlib.import_module(_MODULES[device])
            _loaded[device] = True
        except ImportError as e:  # only kernels_cpu imports a library of its own (numba)
            _loaded[device] = False
            print(
                f"minigpt: CPU kernels off, Numba could not be imported ({e}); running the NumPy array code, "
                "which is slower (pip install numba)",
                file=sys.stderr,
            )
    return _loaded[device]
