"""Benchmark GPT training steps (forward, backward, grad clip, AdamW) on random tokens.

Prints median step time, tokens/s, achieved GFLOP/s and MFU against this machine's float32 GEMM
peak (measured here with large NumPy matmuls), and peak RSS; on the GPU also the memory each
engine's caching allocator holds at its peak (CuPy's pool, PyTorch's max_memory_reserved).

    minigpt bench --preset S                                 # nanoGPT's CPU Shakespeare model
    python scripts/bench_train.py --preset S                 # the same
    python scripts/bench_train.py --preset M --vs-torch      # side by side with PyTorch eager
    python scripts/bench_train.py --preset V --vs-torch      # GPT-2's 50,304-token vocabulary, 8 x 512 wide
    python scripts/bench_train.py --preset S --sample        # generation: KV cache vs none
    python scripts/bench_train.py --n-layer 2 --n-embd 64 --block-size 32 --batch-size 4 --vocab-size 100
    python scripts/bench_train.py --preset M --device cuda --vs-torch [--tf32]   # GPU (CuPy vs PyTorch)

On --device cuda the peak is cuBLAS's (a CuPy matmul) and every timed step ends synchronised.
--tf32 lets float32 GEMMs use TF32 tensor cores in both engines: CUPY_TF32=1 (in the timed
processes' environment, so CuPy reads it on import) and torch.backends.cuda.matmul.allow_tf32.

With --vs-torch the same model (same weights, batches, dtype and threads) is built in PyTorch.
Each engine is timed in a fresh process of its own, as a user runs it, and the engines take turns
(--rounds of each, alternating), so machine noise hits both alike; the step time is the median over
all rounds. (In one process they disturb each other: OpenBLAS's and OpenMP's idle threads spin
after their work, and a pause to let them settle lets the VM's idle vCPUs sleep, which slows the
next thread hand-off.) Peak RSS, and GPU memory on "cuda", come from the same processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.autograd import mkl, parallel
from minigpt.autograd.backend import cupy_module, get_array_module, normalize_device, to_device
from minigpt.cli import Parser
from minigpt.errors import UserError, cli_main
from minigpt.gpt import GPT, GPTConfig
from minigpt.local_parallel import LocalDataParallel, processes_for
from minigpt.optim import AdamW, clip_grad_norm_
from minigpt.train import _forward_backward  # the step as train() takes it

SIZE_FLAGS = {
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "embedding width",
    "block_size": "context length in tokens",
    "batch_size": "sequences per step",
    "vocab_size": "vocabulary size (random tokens)",
}
CONFIGS = {
    "S": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    "M": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
    "GPT2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, vocab_size=50304),
    "V": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=4, vocab_size=50304),  # GPT-2's vocabulary
}


def synchronize(device: str) -> None:
    """Wait until the GPU has finished the work queued so far (a no-op on the CPU)."""
    if device == "cuda":
        cupy_module().cuda.Device().synchronize()


def gemm_peak_gflops(n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    """Best float32 GEMM rate on n x n matrices: on the CPU minigpt's GEMM (NumPy's BLAS, or MKL) over its threads
    (one row slice each: as fast as OpenBLAS's own threading), cuBLAS (via CuPy) on "cuda"."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a, b = to_device(a, device), to_device(b, device)
    parallel.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        parallel.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_step(s: dict[str, int]) -> float:
    """Matmul FLOPs of one training step: forward GEMMs x 3 (backward costs twice the forward)."""
    B, T, C, L, V = s["batch_size"], s["block_size"], s["n_embd"], s["n_layer"], s["vocab_size"]
    per_layer = 2 * B * T * C * (3 * C + C + 8 * C) + 2 * 2 * B * T * T * C  # qkv, proj, mlp; q@k, att@v
    return 3.0 * (L * per_layer + 2 * B * T * C * V)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, since ru_maxrss survives fork+exec from the parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _lm_loss(model: GPT, batch: tuple[np.ndarray, np.ndarray]) -> Any:
    return model(*batch)[1]


class MinigptRunner:
    """minigpt's step as `train` runs it: on the CPU each batch shared out among processes (see
    minigpt.local_parallel; `processes` 1 keeps it on this process's threads)."""

    def __init__(self, s: dict[str, int], device: str, seed: int = 0, processes: int | None = None):
        cfg = GPTConfig(**{k: s[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")})
        self.model, self.device = GPT(cfg, rng=np.random.default_rng(seed)).to(device), device
        self.opt = AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
        self.params = list(self.model.parameters())
        if processes is None:
            processes = processes_for(self.model, device, data_parallel=False)
        self.split = LocalDataParallel(self.model, _lm_loss, processes) if processes > 1 else None  # forks at step 1

    def step(self, x: np.ndarray, y: np.ndarray) -> Any:
        self.opt.zero_grad()
        loss = _forward_backward(self.model, lambda: (x, y), _lm_loss, 1, self.device, self.split)
        clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        xp = get_array_module(loss)
        if xp is not np:
            xp.cuda.Device().synchronize()
        return loss

    def close(self) -> float:
        """Stop the workers; returns the memory they held apart from this process's (MB)."""
        if self.split is None:
            return 0.0
        mb = self.split.workers_private_mb()
        self.split.close()
        return mb


class TorchRunner:
    """The same GPT in PyTorch eager (nanoGPT's model.py in brief), initialised from minigpt's weights."""

    def __init__(self, s: dict[str, int], device: str, weights: dict[str, np.ndarray], tf32: bool = False):
        import torch
        import torch.nn.functional as TF
        from torch import nn

        torch.backends.cuda.matmul.allow_tf32 = tf32  # PyTorch's default is False: plain float32 GEMMs

        C, nh = s["n_embd"], s["n_head"]

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ln_1 = nn.LayerNorm(C, bias=False)
                self.c_attn = nn.Linear(C, 3 * C, bias=False)
                self.attn_proj = nn.Linear(C, C, bias=False)
                self.ln_2 = nn.LayerNorm(C, bias=False)
                self.c_fc = nn.Linear(C, 4 * C, bias=False)
                self.mlp_proj = nn.Linear(4 * C, C, bias=False)

            def forward(self, x):
                B, T, _ = x.shape
                q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
                q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
                y = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
                x = x + self.attn_proj(y)
                return x + self.mlp_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

        class TorchGPT(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.wte = nn.Embedding(s["vocab_size"], C)
                self.wpe = nn.Embedding(s["block_size"], C)
                self.h = nn.ModuleList([Block() for _ in range(s["n_layer"])])
                self.ln_f = nn.LayerNorm(C, bias=False)

            def forward(self, idx, targets):
                x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
                for block in self.h:
                    x = block(x)
                logits = TF.linear(self.ln_f(x), self.wte.weight)  # tied lm_head
                return TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

        self.torch = torch
        self.device = device
        self.model = TorchGPT().to(device)
        ours_to_theirs = {
            "transformer.wte.weight": "wte.weight",
            "transformer.wpe.weight": "wpe.weight",
            "transformer.ln_f.weight": "ln_f.weight",
        }
        for i in range(s["n_layer"]):
            for a, b in [
                ("ln_1.weight", "ln_1.weight"),
                ("attn.c_attn.weight", "c_attn.weight"),
                ("attn.c_proj.weight", "attn_proj.weight"),
                ("ln_2.weight", "ln_2.weight"),
                ("mlp.c_fc.weight", "c_fc.weight"),
                ("mlp.c_proj.weight", "mlp_proj.weight"),
            ]:
                ours_to_theirs[f"transformer.h.{i}.{a}"] = f"h.{i}.{b}"
        state = {
            theirs: torch.from_numpy(np.ascontiguousarray(weights[ours])) for ours, theirs in ours_to_theirs.items()
        }
        self.model.load_state_dict(state)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            betas=(0.9, 0.99),
        )

    def step(self, x: np.ndarray, y: np.ndarray) -> Any:
        torch = self.torch
        xt, yt = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        loss = self.model(xt, yt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return loss


def batches(s: dict[str, int], n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (s["batch_size"], s["block_size"])
    return [(rng.integers(0, s["vocab_size"], shape), rng.integers(0, s["vocab_size"], shape)) for _ in range(n)]


def peak_gpu_mb(engine: str) -> float:
    """GPU memory the engine's caching allocator holds (its peak: neither pool gives memory back)."""
    if engine == "torch":
        import torch

        return torch.cuda.max_memory_reserved() / 2**20
    return cupy_module().get_default_memory_pool().total_bytes() / 2**20


def run_child(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    """Time one engine in a fresh process: its step times (s), losses, peak RSS and GPU memory (MB)."""
    cmd = [sys.executable, "-m", "minigpt.bench", "--child", engine, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    cmd += ["--device", args.device] + ["--" + k.replace("_", "-") + "=" + str(v) for k, v in settings(args).items()]
    cmd += ["--tf32"] if args.tf32 else []
    package_dir = str(Path(__file__).resolve().parents[1])  # a checkout that is not installed works too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_dir, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: the {engine} process failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(args: argparse.Namespace, s: dict[str, int]) -> None:
    runner: Any = MinigptRunner(s, args.device)
    if args.child == "torch":
        import torch

        torch.set_num_threads(parallel.get_num_threads())  # as many threads as minigpt uses
        weights = runner.model.state_dict()
        del runner  # only the PyTorch model's memory counts
        runner = TorchRunner(s, args.device, weights, args.tf32)
    times, losses = [], []
    for i, (x, y) in enumerate(batches(s, args.warmup + args.steps)):
        synchronize(args.device)  # start the clock on an idle GPU (each step ends synchronised too)
        t0 = time.perf_counter()
        loss = runner.step(x, y)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.item()))
    gpu = {"gpu_mb": peak_gpu_mb(args.child)} if args.device == "cuda" else {}
    workers_mb = runner.close() if args.child == "minigpt" else 0.0
    print(json.dumps({"times": times, "losses": losses, "peak_rss_mb": peak_rss_mb(), "workers_mb": workers_mb, **gpu}))


def settings(args: argparse.Namespace) -> dict[str, int]:
    s = dict(CONFIGS[args.preset]) if args.preset else dict(CONFIGS["S"])
    for key in SIZE_FLAGS:
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def bench_sampling(s: dict[str, int], device: str, new_tokens: int, repeats: int = 3) -> None:
    """Generation tokens/s with and without the KV cache: the median of `repeats` runs each, taking turns."""
    runner = MinigptRunner(s, device)
    prompt = np.zeros((1, 1), dtype=np.int64)
    print(f"\nsampling: batch 1, {new_tokens} new tokens, block {s['block_size']}, median of {repeats} runs")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for use_cache in (True, False):
            t0 = time.perf_counter()
            runner.model.generate(prompt, new_tokens, temperature=1.0, seed=0, use_cache=use_cache)
            seconds[use_cache].append(time.perf_counter() - t0)
    rates = {use_cache: new_tokens / float(np.median(times)) for use_cache, times in seconds.items()}
    for use_cache, rate in rates.items():
        print(f"  {'KV cache' if use_cache else 'no cache':<9} {rate:10,.0f} tokens/s  ({new_tokens / rate:.2f} s)")
    print(f"  cache speed-up: {rates[True] / rates[False]:.1f}x")


@cli_main
def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = "; ".join(f"{name}: {', '.join(f'{k} {v}' for k, v in s.items())}" for name, s in CONFIGS.items())
    parser.add_argument("--preset", choices=sorted(CONFIGS), help=f"a named size (default S). {presets}")
    for key, what in SIZE_FLAGS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, metavar="N", help=f"{what} (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per process (default: 2)")
    parser.add_argument(
        "--device", default="cpu", help='"cpu" or "cuda" (CuPy; PyTorch on the same GPU) (default: cpu)'
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 tensor-core GEMMs (CuPy and PyTorch)")
    parser.add_argument("--vs-torch", action="store_true", help="time PyTorch eager side by side")
    parser.add_argument("--sample", action="store_true", help="also time generation with and without KV cache")
    parser.add_argument("--sample-tokens", type=int, default=500, help="tokens generated by --sample (default: 500)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per engine, taking turns (default: 2)")
    parser.add_argument("--child", choices=["minigpt", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tf32:  # CuPy reads CUPY_TF32 when it is imported: the timed processes inherit it from here
        os.environ["CUPY_TF32"] = "1"
    try:
        args.device = normalize_device(args.device)  # "cuda:0" -> "cuda"
    except (ValueError, RuntimeError) as e:  # no CuPy or no usable GPU: the cause in one line
        raise UserError(f"--device {args.device} is unusable: {e}") from None
    s = settings(args)
    if args.child:
        child_main(args, s)
        return

    tokens = s["batch_size"] * s["block_size"]
    print(f"preset {args.preset or 'S'}: {s}, {parallel.get_num_threads()} threads, device {args.device}")
    n, lib = (8192, "CuPy/cuBLAS") if args.device == "cuda" else (2048, mkl.describe())
    peak = gemm_peak_gflops(n, device=args.device)
    tf32 = " (TF32)" if args.tf32 and args.device == "cuda" else ""
    print(f"float32{tf32} GEMM peak ({n}^3 {lib} matmul): {peak:.1f} GFLOP/s")
    engines = ["minigpt"]
    if args.vs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError("--vs-torch needs PyTorch: pip install torch") from None
        engines.append("torch")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name in engines:  # alternate, so machine noise hits both alike
            runs[name].append(run_child(args, name))
    flops = flops_per_step(s)
    rates = {}
    for name in engines:
        step = float(np.median([t for run in runs[name] for t in run["times"]]))
        rates[name] = tokens / step
        gflops = flops / step / 1e9
        rss = max(run["peak_rss_mb"] for run in runs[name])
        workers = max(run["workers_mb"] for run in runs[name])
        rss_text = f"{rss:7.0f} MB" + (f" (+{workers:.0f} MB in workers)" if workers else "")
        gpu = f" | GPU {max(run['gpu_mb'] for run in runs[name]):6.0f} MB" if args.device == "cuda" else ""
        losses = runs[name][0]["losses"]
        print(
            f"{name:<8} step {step * 1e3:8.1f} ms | {tokens / step:10,.0f} tokens/s | {gflops:8.1f} GFLOP/s | "
            f"MFU {gflops / peak:5.1%} | peak RSS {rss_text}{gpu} | loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    if args.vs_torch:
        print(f"throughput ratio minigpt/PyTorch: {rates['minigpt'] / rates['torch']:.2f}x")
    if args.sample:
        bench_sampling(s, args.device, args.sample_tokens)


if __name__ == "__main__":
    main()
