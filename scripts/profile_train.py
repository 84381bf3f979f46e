"""Where a GPT training step spends its time: forward and backward milliseconds per op class.

    python scripts/profile_train.py --preset M
    python scripts/profile_train.py --preset S --steps 10
    python scripts/profile_train.py --preset S --steps 100 --processes 2   # as train() runs on 2 cores

Wraps every Function's forward and backward with a timer (a few µs of overhead per op), runs a
few steps of bench_train.py's model, and prints per-step totals, largest first. With --processes N
the batch is shared out as train() does (minigpt.local_parallel): the phases are the parent's, the
op times those of its part.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.autograd import function  # noqa: E402
from minigpt.bench import CONFIGS, MinigptRunner, batches  # noqa: E402
from minigpt.optim import clip_grad_norm_  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(CONFIGS), default="M", help="a named size, as bench_train.py's (default: M)"
    )
    parser.add_argument("--steps", type=int, default=4, help="profiled training steps (default: 4)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes sharing each batch (default: 1, this one on its threads)"
    )
    args = parser.parse_args(argv)

    forward_s: dict[str, float] = collections.defaultdict(float)
    backward_s: dict[str, float] = collections.defaultdict(float)
    apply = function.Function.apply.__func__

    def timed_apply(cls, *inputs, **kwargs):
        t0 = time.perf_counter()
        out = apply(cls, *inputs, **kwargs)
        forward_s[cls.__name__] += time.perf_counter() - t0
        ctx = (out[0] if type(out) is tuple else out)._ctx  # a multi-output op (Split) returns a tuple
        if ctx is not None:
            backward = ctx.backward

            def timed_backward(g, backward=backward, name=cls.__name__):
                t0 = time.perf_counter()
                grads = backward(g)
                backward_s[name] += time.perf_counter() - t0
                return grads

            ctx.backward = timed_backward
        return out

    function.Function.apply = classmethod(timed_apply)
    s = {**CONFIGS[args.preset], **({"batch_size": args.batch_size} if args.batch_size else {})}
    runner = MinigptRunner(s, "cpu", processes=args.processes)
    data = batches(s, args.steps + 2)
    for x, y in data[:2]:  # warm-up, not counted: the heap reaches its size in the second step (V: 30,000 page faults)
        runner.step(x, y)
    forward_s.clear()
    backward_s.clear()
    phases = collections.defaultdict(float)
    for x, y in data[2:]:
        t0 = time.perf_counter()
        runner.opt.zero_grad()
        if runner.split is not None:  # both halves' forward and backward, and the gradients added
            runner.split.forward_backward((x, y))
            t1 = t2 = time.perf_counter()
        else:
            _, loss = runner.model(x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        clip_grad_norm_(runner.params, 1.0)
        t3 = time.perf_counter()
        runner.opt.step()
        t4 = time.perf_counter()
        if runner.split is not None:
            phases["forward+backward"] += t2 - t0
        else:
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
        phases["clip"] += t3 - t2
        phases["adamw"] += t4 - t3
    runner.close()
    n = args.steps
    ms = {k: v / n * 1e3 for k, v in phases.items()}
    print(f"config {args.preset}: step {sum(ms.values()):.1f} ms = " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))
    for name in sorted(set(forward_s) | set(backward_s), key=lambda k: -(forward_s[k] + backward_s[k])):
        fwd, bwd = forward_s[name] / n * 1e3, backward_s[name] / n * 1e3
        print(f"  {name:<28} forward {fwd:8.1f} ms   backward {bwd:8.1f} ms")


if __name__ == "__main__":
    main()
