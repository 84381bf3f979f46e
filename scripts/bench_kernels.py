"""Time each CUDA kernel of minigpt.autograd.kernels_cuda against the CuPy array code it replaces.

Every fused op runs forward + backward on GPT-sized float32 CuPy arrays, with the kernels on and
then off (MINIGPT_NO_CUDA_KERNELS), timed with CUDA events (median of --reps after a warm-up).
Prints µs per op, the speed-up and the effective bandwidth against the minimum bytes each op must
move. Needs CuPy and an NVIDIA GPU.

    python scripts/bench_kernels.py                  # GPT-2-small shapes (B=8, T=1024, C=768)
    python scripts/bench_kernels.py --preset M       # bench_train.py's config M
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.autograd import fused, kernels_cuda
from minigpt.autograd.backend import cupy_module, to_device
from minigpt.errors import cli_main

SHAPES = {  # B, T, C, n_head, vocab
    "M": (8, 256, 384, 6, 65),
    "GPT2": (8, 1024, 768, 12, 50304),
}


def time_op(cp: Any, cls: type, arrays: list[Any], reps: int, **kwargs: Any) -> tuple[float, float]:
    """Median µs of the forward and of the backward of a fused op on raw arrays."""
    g = None
    start, mid, end = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
    fwd, bwd = [], []
    for i in range(reps + 3):
        fn = cls()
        fn.needs_input_grad = [True] * len(arrays)
        start.record()
        out = fn.forward(*arrays, **kwargs)
        mid.record()
        if g is None:
            g = cp.asarray(np.cos(np.arange(out.size) * 0.7).reshape(out.shape).astype(out.dtype))
            mid.record()
        fn.backward(g)
        end.record()
        end.synchronize()
        if i >= 3:
            fwd.append(cp.cuda.get_elapsed_time(start, mid) * 1e3)
            bwd.append(cp.cuda.get_elapsed_time(mid, end) * 1e3)
    return float(np.median(fwd)), float(np.median(bwd))


def time_adamw(cp: Any, shape: tuple[int, ...], reps: int) -> float:
    """Median µs of one AdamW update of a parameter of `shape` (the optimizer's own code path)."""
    from minigpt import Tensor
    from minigpt.optim import AdamW

    rng = np.random.default_rng(0)
    p = Tensor(to_device(rng.standard_normal(shape).astype(np.float32), "cuda"), requires_grad=True)
    opt = AdamW([p], lr=1e-3, weight_decay=0.1)
    p.grad = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for i in range(reps + 3):
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(SHAPES), default="GPT2", help="a named size, as bench_train.py's (default: GPT2)"
    )
    parser.add_argument("--reps", type=int, default=20, help="timed runs per kernel; the median is shown (default: 20)")
    args = parser.parse_args()
    cp = cupy_module()
    B, T, C, nh, V = SHAPES[args.preset]
    N, hs = B * T, C // nh
    rng = np.random.default_rng(0)

    def randn(*shape: int) -> Any:
        return cp.asarray(rng.standard_normal(shape).astype(np.float32))

    f4 = 4  # bytes per float32
    # name -> (op class, arrays, kwargs, minimum bytes forward + backward must move)
    cases = {
        "gelu (N, 4C)": (fused.Gelu, [randn(N, 4 * C)], {}, f4 * N * 4 * C * 5),
        "layer_norm (N, C)": (fused.LayerNorm, [randn(N, C), randn(C)], dict(eps=1e-5), f4 * N * C * 5),
        "cross_entropy (N, V)": (
            fused.CrossEntropy,
            [randn(N, V)],
            dict(targets=cp.asarray(rng.integers(0, V, N)), ignore_index=-1),
            f4 * N * V * 3,
        ),
        "attention (B, nh, T, hs)": (
            fused.ScaledDotProductAttention,
            [randn(B, nh, T, hs) for _ in range(3)],
            dict(is_causal=True, dropout_p=0.0, rng=None),
            f4 * B * nh * T * T * 6,  # the (T, T) scores: written, softmaxed, read back in the backward
        ),
        "embedding (V, C)": (
            fused.Embedding,
            [randn(V, C)],
            dict(ids=cp.asarray(rng.integers(0, V, (B, T)))),
            f4 * (N * C * 2 + V * C),
        ),  # fmt: skip
    }
    print(f"config {args.preset}: B={B} T={T} C={C} n_head={nh} vocab={V}; float32, median of {args.reps}")
    print(
        f"{'op (forward+backward)':<26}{'kernels µs':>12}{'(fwd + bwd)':>16}{'CuPy µs':>12}{'(fwd + bwd)':>16}"
        f"{'speed-up':>10}{'kernels GB/s':>14}"
    )
    for name, (cls, arrays, kwargs, nbytes) in cases.items():
        os.environ.pop(kernels_cuda.DISABLE_ENV, None)
        on = time_op(cp, cls, arrays, args.reps, **kwargs)
        os.environ[kernels_cuda.DISABLE_ENV] = "1"
        off = time_op(cp, cls, arrays, args.reps, **kwargs)
        split_on, split_off = f"{on[0]:.0f} + {on[1]:.0f}", f"{off[0]:.0f} + {off[1]:.0f}"
        print(
            f"{name:<26}{sum(on):12.1f}{split_on:>16}{sum(off):12.1f}{split_off:>16}"
            f"{sum(off) / sum(on):9.2f}x{nbytes / sum(on) / 1e3:14.0f}"
        )
    shape = (4 * C, C)
    os.environ.pop(kernels_cuda.DISABLE_ENV, None)
    on = time_adamw(cp, shape, args.reps)
    os.environ[kernels_cuda.DISABLE_ENV] = "1"
    off = time_adamw(cp, shape, args.reps)
    nbytes = f4 * 4 * C * C * 7  # read p, g, m, v; write p, m, v
    print(f"{'adamw (4C, C)':<26}{on:12.1f}{'':>16}{off:12.1f}{'':>16}{off / on:9.2f}x{nbytes / on / 1e3:14.0f}")
    os.environ.pop(kernels_cuda.DISABLE_ENV, None)


if __name__ == "__main__":
    cli_main(main)()
