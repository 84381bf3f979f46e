"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports CuPy. Everything else asks it for the array module of an
array (`xp = get_array_module(a)`) and writes one code path for both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # CUDA errors read "cudaErrorInsufficientDriver: CUDA driver version is ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_GPU_PROBLEM = ""  # why the GPU cannot be used, in one line ("" when it can)
try:  # CuPy is optional: `pip install -e ".[gpu]"`
    import cupy as _cupy
except ImportError as e:
    _cupy = None
    if isinstance(e, ModuleNotFoundError) and e.name == "cupy":
        _GPU_PROBLEM = 'CuPy is not installed: pip install -e ".[gpu]"'
    else:  # CuPy is there but something it imports is not
        _GPU_PROBLEM = f"CuPy does not import: {_one_line(e)}"
except Exception as e:  # an installed CuPy that cannot load its CUDA libraries
    _cupy = None
    _GPU_PROBLEM = f"CuPy does not import: {_one_line(e)}"
else:
    try:
        if _cupy.cuda.runtime.getDeviceCount() == 0:
            _GPU_PROBLEM = "CuPy sees no GPU"
    except Exception as e:  # no driver, too old a driver, no device node
        _GPU_PROBLEM = f"CuPy cannot reach a GPU: {_one_line(e)}"
_HAS_GPU = not _GPU_PROBLEM

Array = Any  # numpy.ndarray or cupy.ndarray


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    return _HAS_GPU


def cuda_unavailable_reason() -> str:
    """Why `cuda_available()` is False, in one line with the real cause (e.g. cudaErrorInsufficientDriver); else ""."""
    return _GPU_PROBLEM


def cupy_module() -> Any:
    """The cupy module itself (for kernels); raises a clear one-line error, with the cause, when it cannot be used."""
    if not _HAS_GPU:
        raise RuntimeError(f'device "cuda" needs CuPy and an NVIDIA GPU; {_GPU_PROBLEM}')
    return _cupy


def get_array_module(a: Array) -> Any:
    """numpy or cupy, whichever `a` belongs to."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return np


def is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) or (_cupy is not None and isinstance(a, _cupy.ndarray))


def device_of(a: Array) -> str:
    return "cuda" if _cupy is not None and isinstance(a, _cupy.ndarray) else "cpu"


def normalize_device(device: str | None) -> str:
    if device is None:
        return "cpu"
    name = str(device)
    if name == "cpu":
        return "cpu"
    if name == "gpu" or name == "cuda" or name.startswith("cuda:"):
        cupy_module()  # raises if unusable
        return "cuda"
    raise ValueError(f'unknown device {device!r}: use "cpu" or "cuda"')


def to_device(a: Array, device: str) -> Array:
    """Move an array to "cpu" or "cuda"; a no-op when it is already there."""
    device = normalize_device(device)
    if device == "cpu":
        if isinstance(a, np.ndarray):
            return a
        return _cupy.asnumpy(a) if _cupy is not None and isinstance(a, _cupy.ndarray) else np.asarray(a)
    cp = cupy_module()
    return a if isinstance(a, cp.ndarray) else cp.asarray(a)


def to_numpy(a: Array) -> np.ndarray:
    return to_device(a, "cpu")


def flat_views(flat: Array, shapes: list[tuple[int, ...]]) -> list[Array]:
    """Consecutive pieces of a flat array, in `shapes` (views: writing one writes `flat`)."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return views


def index_add_rows(n_rows: int, ids: Array, values: Array) -> Array:
    """out[ids[i]] += values[i] for a (n_rows, C) out, with repeated ids summed (scatter-add).

    NumPy's `np.add.at` is slow; a one-hot GEMM wins for small row counts (character vocabularies)
    and a sort + segment sum (`np.add.reduceat`) otherwise. CuPy has a native scatter-add.
    """
    xp = get_array_module(values)
    ids = ids.reshape(-1)
    values = values.reshape(ids.shape[0], -1)
    out_shape = (n_rows, values.shape[1])
    if xp is not np:
        out = xp.zeros(out_shape, dtype=values.dtype)
        scatter_add(out, ids, values)
        return out
    if n_rows <= 512 and ids.shape[0] >= n_rows:
        onehot = np.zeros((n_rows, ids.shape[0]), dtype=values.dtype)
        onehot[ids, np.arange(ids.shape[0])] = 1
        return onehot @ values
    out = np.zeros(out_shape, dtype=values.dtype)
    if ids.shape[0] == 0:
        return out
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    out[sorted_ids[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def scatter_add(out: Array, index: Any, values: Array) -> None:
    """out[index] += values, summing over repeated indices (`add.at` in NumPy and CuPy >= 13)."""
    xp = get_array_module(out)
    if hasattr(xp.add, "at"):
        xp.add.at(out, index, values)
    else:  # older CuPy
        import cupyx

        cupyx.scatter_add(out, index, values)


def random_uniform(rng: Any, shape: tuple[int, ...], like: Array) -> Array:
    """Uniform [0, 1) samples of `like`'s dtype on `like`'s device, from a NumPy or CuPy Generator."""
    xp = get_array_module(like)
    if rng is None:
        rng = xp.random.default_rng()
    dtype = like.dtype if like.dtype in (np.float32, np.float64) else np.float32
    sample = rng.random(shape, dtype=dtype)
    return sample if get_array_module(sample) is xp else to_device(sample, device_of(like))


# ----------------------------------------------------------------------------- CPU memory


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step frees and reallocates the same large activation buffers every step. By default
    glibc unmaps big blocks on free, so each step page-faults all its activations in again (a
    quarter of a GPT step's non-GEMM time here; on a VM whose freed pages go back to the host, a
    first touch costs up to 10x more). Like PyTorch's caching allocator, we keep them: every block
    comes from the heap (no mmap, however large: GPT-2's logits are 400 MB), and the heap is not
    trimmed. Returns whether it applied (glibc only; MINIGPT_KEEP_MEMORY=0 opts out). Not applied
    on import: the first backward pass applies it (Tensor.backward), as it is training that reuses
    the buffers.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("MINIGPT_KEEP_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # malloc.h
    return bool(
        libc.mallopt(m_mmap_max, 0)  # no block is mmapped (glibc still falls back to mmap if the heap cannot grow)
        and libc.mallopt(m_trim_threshold, 2**31 - 1)  # mallopt takes a C int: 1 << 62 would wrap to 0
        and libc.mallopt(m_top_pad, 64 << 20)
    )
