"""The Linear GEMMs of a training step, NumPy's BLAS against PyTorch's: the floor of minigpt's CPU step.

    python scripts/bench_gemm.py --preset S
    python scripts/bench_gemm.py --preset M --rounds 3

Times each Linear layer's three GEMMs (forward x @ W.T, backward g @ W and g.T @ x) at a preset's
shapes, for one process's share of the batch (the rows `train` gives each process on the CPU, see
minigpt.local_parallel) on one thread, the operands hot in cache: NumPy (OpenBLAS in its wheels)
and PyTorch (MKL on x86), and MKL called by minigpt where the `mkl` extra is installed, each
engine in its own processes, by turns. minigpt's step runs these GEMMs through NumPy (or MKL, with
the extra), so where PyTorch's BLAS is faster at a preset's shapes, that bounds how far ahead of
PyTorch eager minigpt's step can get. Attention's small batched GEMMs are left out.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.autograd.parallel import get_num_threads  # noqa: E402
from minigpt.bench import CONFIGS  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def linear_shapes(s: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(name, count per step, in features, out features) of the GPT's Linear layers (lm_head once)."""
    c, n = s["n_embd"], s["n_layer"]
    return [("qkv", n, c, 3 * c), ("attn proj", n, c, c), ("mlp fc", n, c, 4 * c), ("mlp proj", n, 4 * c, c),
            ("lm_head", 1, c, s["vocab_size"])]  # fmt: skip


def time_gemms(engine: str, rows: int, shapes: list[tuple[str, int, int, int]], reps: int) -> list[list[float]]:
    """Best-of-reps seconds of [x @ W.T, g @ W, g.T @ x] per shape, in this process on one thread."""
    import numpy as np

    rng = np.random.default_rng(0)
    convert, product = np.asarray, operator.matmul
    if engine == "torch":
        import torch

        torch.set_num_threads(1)
        convert = torch.from_numpy
    elif engine == "mkl":
        from minigpt.autograd import mkl

        if not mkl.available():
            raise ImportError("the mkl extra is not installed")
        product = mkl.matmul
    results = []
    for _, _, fan_in, fan_out in shapes:
        x, w, g = (convert(rng.standard_normal(shape, dtype=np.float32))
                   for shape in ((rows, fan_in), (fan_out, fan_in), (rows, fan_out)))  # fmt: skip
        best = []
        for a, b in ((x, w.T), (g, w), (g.T, x)):
            product(a, b)  # warm: BLAS buffers, the operands in cache
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                product(a, b)
                times.append(time.perf_counter() - t0)
            best.append(min(times))
        results.append(best)
    return results


def run_child(engine: str, rows: int, s: dict[str, int], reps: int) -> list[list[float]] | None:
    """time_gemms in a fresh process at one thread; None where the engine is not installed."""
    cmd = [sys.executable, __file__, "--child", engine, "--rows", str(rows), "--reps", str(reps)]
    cmd += ["--sizes", json.dumps(s)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        raise SystemExit(f"bench_gemm: the {engine} process failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(CONFIGS), default="S", help="a named size (default: S)")
    parser.add_argument("--processes", type=int, help="processes sharing a batch (default: minigpt's threads)")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per GEMM, the best kept (default: 50)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per engine, by turns (default: 2)")
    parser.add_argument("--child", choices=("numpy", "mkl", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            print(json.dumps(time_gemms(args.child, args.rows, linear_shapes(json.loads(args.sizes)), args.reps)))
        except ImportError:
            sys.exit(3)
        return

    s = CONFIGS[args.preset]
    processes = args.processes or get_num_threads()
    rows = max(1, s["batch_size"] // max(1, processes)) * s["block_size"]
    shapes = linear_shapes(s)
    best: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        for engine in ("numpy", "mkl", "torch"):
            times = run_child(engine, rows, s, args.reps)
            if times is not None:
                prev = best.get(engine, times)
                best[engine] = [[min(a, b) for a, b in zip(p, t)] for p, t in zip(prev, times)]
    print(f"preset {args.preset}: {rows} rows a process (batch {s['batch_size']} x block {s['block_size']} "
          f"over {processes} processes), one thread, best of {args.reps} calls x {args.rounds} processes")  # fmt: skip
    engines = list(best)
    print(f"{'GEMM':<28}" + "".join(f"{e + ' ms':>12}{'GFLOP/s':>9}" for e in engines))
    totals = dict.fromkeys(engines, 0.0)
    for i, (name, count, fan_in, fan_out) in enumerate(shapes):
        flops = 2.0 * rows * fan_in * fan_out
        for j, what in enumerate(("x @ W.T", "g @ W", "g.T @ x")):
            line = f"{name:<10} {what:<8} {fan_in:>4}->{fan_out:<5}"
            for e in engines:
                t = best[e][i][j]
                totals[e] += count * t
                line += f"{t * 1e3:12.3f}{flops / t / 1e9:9.1f}"
            print(line)
    print("a step's Linear GEMMs: " + ", ".join(f"{e} {totals[e] * 1e3:.2f} ms" for e in engines))
    for engine in ("numpy", "mkl"):
        if engine in totals and "torch" in totals:
            name = "NumPy's BLAS" if engine == "numpy" else "MKL (the mkl extra)"
            print(f"{name} takes {totals[engine] / totals['torch']:.2f}x PyTorch's time at these shapes")
    if "torch" not in totals:
        print("PyTorch is not installed: NumPy alone (pip install torch to compare)")


if __name__ == "__main__":
    main()
