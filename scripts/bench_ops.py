"""Benchmark the engine's ops.

1. Per-op Python overhead: µs per call on tiny tensors, minigpt versus the raw NumPy call.
2. Each fused op at GPT sizes: forward+backward time and peak memory, versus the same maths
   composed from primitive ops.

    python scripts/bench_ops.py            # all sizes
    python scripts/bench_ops.py --quick    # one small size per op
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

import minigpt
from minigpt import functional as F
from minigpt.autograd import composed, no_grad


def per_call_us(fn: Callable[[], object], min_time: float = 0.2) -> float:
    """Best-of-5 mean time per call in µs."""
    n = 1
    while True:  # find a repeat count that runs for ~min_time / 5
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > min_time / 5:
            break
        n *= 2
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def overhead_table() -> None:
    a_np = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    b_np = a_np.copy()
    a, b = minigpt.tensor(a_np), minigpt.tensor(b_np)
    ag = minigpt.tensor(a_np, requires_grad=True)
    cases = [
        ("add", lambda: a_np + b_np, lambda: a + b, lambda: ag + b),
        ("mul", lambda: a_np * b_np, lambda: a * b, lambda: ag * b),
        ("mul scalar", lambda: a_np * 2.0, lambda: a * 2.0, lambda: ag * 2.0),
        ("matmul", lambda: a_np @ b_np, lambda: a @ b, lambda: ag @ b),
        ("exp", lambda: np.exp(a_np), lambda: a.exp(), lambda: ag.exp()),
        ("tanh", lambda: np.tanh(a_np), lambda: a.tanh(), lambda: ag.tanh()),
        ("sum(dim=1)", lambda: a_np.sum(axis=1), lambda: a.sum(dim=1), lambda: ag.sum(dim=1)),
        ("reshape", lambda: a_np.reshape(16), lambda: a.reshape(16), lambda: ag.reshape(16)),
        ("getitem", lambda: a_np[1:3], lambda: a[1:3], lambda: ag[1:3]),
    ]
    print("Per-op overhead on 4x4 float32 (µs per call; overhead = minigpt - numpy)")
    print(f"{'op':<12}{'numpy':>8}{'no_grad':>9}{'overhead':>10}{'w/ graph':>10}{'overhead':>10}")
    overheads, graph_overheads = [], []
    for name, raw, plain, graph in cases:
        t_np = per_call_us(raw)
        with no_grad():
            t_plain = per_call_us(plain)
        t_graph = per_call_us(graph)
        overheads.append(t_plain - t_np)
        graph_overheads.append(t_graph - t_np)
        print(f"{name:<12}{t_np:8.2f}{t_plain:9.2f}{t_plain - t_np:10.2f}{t_graph:10.2f}{t_graph - t_np:10.2f}")
    print(
        f"median overhead: {np.median(overheads):.2f} µs without a graph, "
        f"{np.median(graph_overheads):.2f} µs recording one"
    )


def fwd_bwd(fn: Callable[[], minigpt.Tensor], grad_out: np.ndarray | None) -> Callable[[], None]:
    def step() -> None:
        out = fn()
        if out.ndim == 0:
            out.backward()
        else:
            out.backward(grad_out)

    return step


def peak_mb(step: Callable[[], None]) -> float:
    """Peak traced MB of one call (NumPy reports its buffers to tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def compare(fused: Callable[[], None], composed: Callable[[], None], reps: int) -> tuple[float, float]:
    """Best forward+backward ms of each, timed alternately so machine noise hits both alike."""
    fused(), composed()  # warm up (caches, first-touch)
    best = [math.inf, math.inf]
    for _ in range(reps):
        for i, step in enumerate((fused, composed)):
            t0 = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] * 1e3, best[1] * 1e3


def op_rows(rng: np.random.Generator, B: int, T: int, C: int, nh: int, vocabs: list[int]) -> list[tuple]:
    """(name, size, fused fn, composed fn, output grad) for every fused op at one GPT size."""

    def leaf(*shape):
        return minigpt.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)

    def grad(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x, w, b, h = leaf(B, T, C), leaf(4 * C, C), leaf(4 * C), leaf(B, T, 4 * C)
    ln_w, ln_b = leaf(C), leaf(C)
    q, k, v = (leaf(B, nh, T, C // nh) for _ in range(3))
    tag = f"B={B} T={T} C={C}"
    rows = [
        ("linear C->4C", tag, lambda: F.linear(x, w, b), lambda: composed.linear(x, w, b), grad(B, T, 4 * C)),
        (
            "layer_norm",
            tag,
            lambda: F.layer_norm(x, ln_w, ln_b),
            lambda: composed.layer_norm(x, ln_w, ln_b),
            grad(B, T, C),
        ),
        ("gelu (B,T,4C)", tag, lambda: F.gelu(h), lambda: composed.gelu(h), grad(B, T, 4 * C)),
        ("softmax (B,T,C)", tag, lambda: F.softmax(x), lambda: composed.softmax(x), grad(B, T, C)),
        ("log_softmax", tag, lambda: F.log_softmax(x), lambda: composed.log_softmax(x), grad(B, T, C)),
        (
            f"attention nh={nh}",
            tag,
            lambda: F.scaled_dot_product_attention(q, k, v),
            lambda: composed.scaled_dot_product_attention(q, k, v),
            grad(B, nh, T, C // nh),
        ),
    ]
    for V in vocabs:
        rows += vocab_rows(leaf, rng, B, T, C, V)
    return rows


def vocab_rows(leaf: Callable, rng: np.random.Generator, B: int, T: int, C: int, V: int) -> list[tuple]:
    logits, wte = leaf(B, T, V), leaf(V, C)
    targets, ids = rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))
    g = rng.standard_normal((B, T, C)).astype(np.float32)
    return [
        (
            f"cross_entropy V={V}",
            f"B={B} T={T}",
            lambda: F.cross_entropy(logits, targets),
            lambda: composed.cross_entropy(logits, targets),
            None,
        ),
        (
            f"embedding V={V}",
            f"B={B} T={T} C={C}",
            lambda: F.embedding(ids, wte),
            lambda: composed.embedding(ids, wte),
            g,
        ),
    ]


def fused_table(quick: bool) -> None:
    rng = np.random.default_rng(0)
    sizes = [(12, 64, 128, 4)] if quick else [(12, 64, 128, 4), (12, 256, 384, 6)]
    rows = [row for size in sizes for row in op_rows(rng, *size, vocabs=[65] if quick else [65, 50304])]
    print("\nFused op vs the same maths composed from primitives (forward + backward, float32)")
    print(
        f"{'op':<22}{'size':<22}{'fused ms':>9}{'comp ms':>9}{'speedup':>9}{'fused MB':>10}{'comp MB':>9}{'ratio':>7}"
    )
    for name, tag, fused_fn, composed_fn, g in rows:
        fused_step, composed_step = fwd_bwd(fused_fn, g), fwd_bwd(composed_fn, g)
        tf, tc = compare(fused_step, composed_step, reps=3 if "50304" in name else 15)
        mf, mc = peak_mb(fused_step), peak_mb(composed_step)
        print(f"{name:<22}{tag:<22}{tf:9.2f}{tc:9.2f}{tc / tf:8.2f}x{mf:10.1f}{mc:9.1f}{mc / max(mf, 1e-9):6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small size per fused op")
    args = parser.parse_args()
    overhead_table()
    fused_table(args.quick)


if __name__ == "__main__":
    main()
