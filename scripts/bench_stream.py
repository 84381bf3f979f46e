"""Benchmark streamed sampling's text decoding: seconds to stream N tokens, with the model's work left out.

A stand-in model replays token ids (the corpus encoded by a char tokenizer and by a 512-token BPE), so the
time is all `sample_text`'s decoding and writing. Constant cost per token shows as time growing linearly
with N. Usage: `python scripts/bench_stream.py` (2k, 8k and 32k tokens; best of 3 runs).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from minigpt.data import resolve_corpus
from minigpt.errors import cli_main
from minigpt.inference import sample_text
from minigpt.tokenizers import BPETokenizer, CharTokenizer, Tokenizer


class Replay:
    """A stand-in model whose "generation" is a fixed list of ids, one per step."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def generate_tokens(self, idx: Any, max_new_tokens: int, **kwargs: Any) -> Iterator[np.ndarray]:
        for i in self.ids[:max_new_tokens]:
            yield np.array([i])


def stream_seconds(tokenizer: Tokenizer, ids: list[int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sample_text(Replay(ids), tokenizer, "\n", len(ids), stream=io.StringIO())
        best = min(best, time.perf_counter() - t0)
    return best


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="FILE", help="UTF-8 text to replay (default: train_gpt.py's default text)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2_000, 8_000, 32_000], help="stream lengths to time")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per length; the best is shown")
    args = p.parse_args(argv)
    text, source = resolve_corpus(args.data)
    print(f"text: {source}")
    n = max(args.tokens)
    for tokenizer in (CharTokenizer.from_text(text), BPETokenizer.train(text[:200_000], 512)):
        ids = tokenizer.encode(text[: 8 * n])[:n]
        for k in args.tokens:
            s = stream_seconds(tokenizer, ids[:k], args.repeat)
            print(f"{tokenizer.kind:>4} {k:>7,} tokens: {s:7.3f} s  ({s / k * 1e6:6.1f} us/token)")


if __name__ == "__main__":
    main()
