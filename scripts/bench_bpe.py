"""Benchmark our byte-level BPE: training time, then encode/decode throughput of the trained tokenizer.

Usage: `python scripts/bench_bpe.py` (4,096 tokens on train_gpt.py's default text: Tiny Shakespeare,
downloaded to data/shakespeare_char/ if needed), or with flags such as `--vocab-size 8192 --pattern gpt4
--data my.txt`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from minigpt.data import resolve_corpus
from minigpt.errors import cli_main
from minigpt.tokenizers import BPETokenizer


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="FILE", help="UTF-8 text file (default: train_gpt.py's default text)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary to learn (default: 4096)")
    p.add_argument("--pattern", default="gpt2", help='"gpt2", "gpt4" or a regex in tiktoken syntax')
    p.add_argument("--repeat", type=int, default=3, help="timed runs of encode/decode; the best is shown")
    args = p.parse_args(argv)
    text, source = resolve_corpus(args.data)
    print(f"text: {source}")

    t0 = time.perf_counter()
    tok = BPETokenizer.train(text, args.vocab_size, pattern=args.pattern)
    print(f"train: vocab {tok.vocab_size:,} in {time.perf_counter() - t0:.2f} s (pattern {args.pattern})")

    ids = tok.encode(text)
    assert tok.decode(ids) == text, "round trip failed"
    t_enc = best_time(lambda: tok.encode(text), args.repeat)
    t_dec = best_time(lambda: tok.decode(ids), args.repeat)
    print(f"tokens: {len(ids):,} ({len(text) / len(ids):.2f} chars/token)")
    print(f"encode: {len(text) / t_enc / 1e6:.1f} M chars/s ({t_enc * 1e3:.0f} ms)")
    print(f"decode: {len(text) / t_dec / 1e6:.1f} M chars/s ({t_dec * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
