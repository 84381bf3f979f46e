"""Benchmark data-parallel gradient averaging: the allreduce per training step at a model size.

    mpiexec -n 2 python scripts/bench_allreduce.py --config M        # 2 ranks on this machine
    mpiexec -n 2 python scripts/bench_allreduce.py --config M --step # also time a training step per rank

Prints the bytes each rank sends into the allreduce per step (all gradients in one float32 buffer)
and the time of `Distributed.average_gradients` (copy in, allreduce, copy out), min and median over
--repeats; with --step, the time of one forward+backward at the config's batch on each rank, run
concurrently on all ranks as in training, so the allreduce's share of a step is measured here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import distributed
from minigpt.errors import UserError, cli_main
from minigpt.gpt import GPT, GPTConfig

CONFIGS = {  # the model shapes of scripts/bench_train.py
    "S": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    "M": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
    "GPT2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, vocab_size=50304),
}


def timed(fn, comm, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="M")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step", action="store_true", help="also time forward+backward per rank")
    args = parser.parse_args(argv)
    with distributed.session() as dist:
        if dist.comm is None:
            raise UserError("run under MPI: mpiexec -n 2 python scripts/bench_allreduce.py")
        from mpi4py import MPI

        shape = dict(CONFIGS[args.config])
        batch_size = shape.pop("batch_size")
        model = GPT(GPTConfig(**shape), rng=np.random.default_rng(0))
        params = list(model.parameters())
        rng = np.random.default_rng(dist.rank)
        for p in params:
            p.grad = rng.standard_normal(p.data.shape).astype(np.float32)
        n_floats = sum(p.data.size for p in params) + 2
        loss = np.float32(1.0)
        reduce_times = timed(lambda: dist.average_gradients(params, loss, False), dist.comm, args.repeats)
        buf = np.ones(n_floats, dtype=np.float32)
        raw_times = timed(lambda: dist.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), dist.comm, args.repeats)
        step_times: list[float] = []
        if args.step:
            idx = rng.integers(0, shape["vocab_size"], size=(batch_size, shape["block_size"] + 1))

            def step() -> None:
                for p in params:
                    p.grad = None
                _, out = model(idx[:, :-1], idx[:, 1:])
                out.backward()

            step()  # warm-up (kernel compilation)
            step_times = timed(step, dist.comm, max(3, args.repeats // 4))
        gathered = dist.gather((reduce_times, step_times, raw_times))
        if dist.is_main:
            worst = np.max([g[0] for g in gathered], axis=0)  # a collective ends when its slowest rank does
            print(
                f"config {args.config}: {n_floats - 2:,} parameters; {dist.world_size} ranks; "
                f"allreduce buffer {n_floats * 4 / 1e6:.1f} MB per rank per step"
            )
            print(
                f"average_gradients: min {worst.min() * 1e3:.1f} ms, median {np.median(worst) * 1e3:.1f} ms "
                f"over {args.repeats} repeats"
            )
            raw = np.max([g[2] for g in gathered], axis=0)
            print(
                f"of which the MPI Allreduce alone: min {raw.min() * 1e3:.1f} ms, median {np.median(raw) * 1e3:.1f} ms "
                f"({n_floats * 4 / raw.min() / 1e9:.2f} GB/s of buffer at the min)"
            )
            if step_times:
                steps = np.max([g[1] for g in gathered], axis=0)
                print(
                    f"forward+backward at batch {batch_size} (all ranks at once): min {steps.min() * 1e3:.0f} ms, "
                    f"median {np.median(steps) * 1e3:.0f} ms; allreduce share of a step "
                    f"{np.median(worst) / (np.median(steps) + np.median(worst)):.1%}"
                )


if __name__ == "__main__":
    main()
