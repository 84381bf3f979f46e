"""Intel MKL's GEMM for minigpt's 2-D CPU products, where the `mkl` extra is installed.

NumPy's wheels multiply with OpenBLAS. On Intel CPUs with AVX-512, MKL's GEMM is ~10-15% faster at
a GPT's Linear shapes (`python scripts/bench_gemm.py`), and those GEMMs are most of a CPU training
step (docs/cpu_performance.md). MKL is Intel's (Intel Simplified Software License) and about 1 GB
installed with its dependencies, so it is an opt-in extra, never needed: `pip install -e ".[mkl]"`
(an `mkl` package installed for other reasons serves too).

It is loaded on minigpt's first CPU GEMM (not on import), through its single-library entry point
libmkl_rt with the sequential threading layer: minigpt's own threads share GEMMs out (parallel.py)
as they do OpenBLAS's, so MKL starts no threads of its own. The layer is a setting of that library
for the whole process: code elsewhere in the process that calls the same libmkl_rt gets it too
(where NumPy itself is built on MKL, as conda's is, minigpt leaves MKL alone and uses NumPy's).
Only 2-D float32/float64 products whose operands have a unit stride in one dimension go to MKL;
batched ones (attention's) and everything else stay NumPy's. MINIGPT_NO_MKL=1 keeps NumPy's BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import site
import sys
from pathlib import Path
from typing import Any

import numpy as np

SWITCH = "MINIGPT_NO_MKL"
_ROW_MAJOR, _NO_TRANS, _TRANS, _SEQUENTIAL = 101, 111, 112, 1  # mkl_cblas.h, mkl_service.h
_INT_MAX = 2**31 - 1  # the LP64 interface takes C ints

_gemms: dict[Any, Any] | None = None  # dtype -> cblas_?gemm, once loaded ({} when MKL is not there)


def library_path() -> str | None:
    """Where libmkl_rt is: the lib/ folder pip's `mkl` wheel fills (this environment's, or the
    user's), else the system's library path; None where it is not installed (or not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, site.USER_BASE or "")):
        for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"):
            if prefix and (Path(prefix) / "lib" / name).is_file():
                return str(Path(prefix) / "lib" / name)
    return ctypes.util.find_library("mkl_rt")


def _load() -> dict[Any, Any]:
    """cblas_sgemm and cblas_dgemm from libmkl_rt, sequential; {} where MKL is off or absent."""
    if os.environ.get(SWITCH, "") not in ("", "0"):
        return {}
    path = library_path()
    if path is None or _numpy_has_mkl():
        return {}
    try:
        lib = ctypes.CDLL(path)  # a CDLL call releases the GIL: minigpt's threads multiply side by side
        lib.MKL_Set_Threading_Layer(ctypes.c_int(_SEQUENTIAL))
    except (OSError, AttributeError) as e:
        print(f"minigpt: MKL found at {path} but not usable ({e}); multiplying with NumPy's BLAS", file=sys.stderr)
        return {}
    gemms = {}
    i, p = ctypes.c_int, ctypes.c_void_p
    for dtype, name, scalar in (
        (np.float32, "cblas_sgemm", ctypes.c_float),
        (np.float64, "cblas_dgemm", ctypes.c_double),
    ):
        fn = gemms[np.dtype(dtype)] = getattr(lib, name)
        fn.argtypes, fn.restype = [i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i], None
    return gemms


def _numpy_has_mkl() -> bool:
    """Whether NumPy itself is built on MKL (conda's builds): then its GEMMs are MKL's already, and
    setting the layer here would make the user's own NumPy products sequential too."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]  # NumPy >= 1.26
    except (TypeError, KeyError):
        return False
    return "mkl" in str(blas.get("name", "")).lower()


def available() -> bool:
    """Whether minigpt multiplies with MKL in this process (loads it on the first call)."""
    global _gemms
    if _gemms is None:
        _gemms = _load()
    return bool(_gemms)


def _layout(a: np.ndarray) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) of a 2-D operand read row-major, or None where
    neither of its dimensions has unit stride (or it is empty, or too big for C ints)."""
    (rows, cols), (s0, s1), size = a.shape, a.strides, a.itemsize
    if s1 == size and s0 % size == 0 and (rows == 1 or s0 >= cols * size):
        flag, ld = _NO_TRANS, max(s0 // size, cols)
    elif s0 == size and s1 % size == 0 and (cols == 1 or s1 >= rows * size):
        flag, ld = _TRANS, max(s1 // size, rows)
    else:
        return None
    return (flag, ld) if rows and cols and ld <= _INT_MAX else None  # max() above: ld covers the row


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b on this thread: MKL's GEMM where it takes the operands (2-D, one float dtype, a unit
    stride in each, `out` C-contiguous and apart from them), else NumPy's matmul."""
    if _gemms is None:
        available()
    gemm = _gemms.get(a.dtype)  # type: ignore[union-attr]
    if gemm is None or type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim != 2 or b.ndim != 2:
        return np.matmul(a, b, out=out)
    (m, k), n = a.shape, b.shape[-1]
    la, lb = _layout(a), _layout(b)
    if la is None or lb is None or b.dtype != a.dtype or b.shape[0] != k:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
    elif out.dtype != a.dtype or out.shape != (m, n) or not out.flags.c_contiguous or _overlaps(out, a, b):
        return np.matmul(a, b, out=out)
    gemm(_ROW_MAJOR, la[0], lb[0], m, n, k, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1], 0.0, out.ctypes.data, n)
    return out


def _overlaps(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    return np.may_share_memory(out, a) or np.may_share_memory(out, b)


def describe() -> str:
    """Which library runs minigpt's CPU GEMMs, in a few words (benchmarks print it)."""
    if available():
        return f"MKL ({library_path()}, the mkl extra)"
    try:
        from threadpoolctl import threadpool_info

        blas = [
            f"{i['internal_api']} {i.get('version') or ''}".strip()
            for i in threadpool_info()
            if i["user_api"] == "blas"
        ]
    except Exception:  # threadpoolctl cannot inspect this process
        blas = []
    return f"NumPy's BLAS ({', '.join(blas) or 'unknown'})"
