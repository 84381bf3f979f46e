"""Prepare Tiny Shakespeare with the GPT-2 BPE tokenizer (tiktoken), as nanoGPT's data/shakespeare.

    python data/shakespeare/prepare.py                # Tiny Shakespeare (see below)
    python data/shakespeare/prepare.py --data my.txt  # any UTF-8 text file instead

The text is input.txt here if present, else the workspace's shared copy (shared/data/tinyshakespeare.txt),
else a download. The GPT-2 vocabulary files come from TIKTOKEN_CACHE_DIR or the shared tiktoken cache, so
this runs offline. Writes train.bin, val.bin (uint16 token ids) and meta.json next to this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_SHAKESPEARE = HERE.parents[2] / "shared" / "data" / "tinyshakespeare.txt"

try:
    import minigpt  # noqa: F401  (normally installed with `pip install -e .`)
except ImportError:  # running from a plain checkout: make the repository root importable
    sys.path.insert(0, str(HERE.parent.parent))

from minigpt.data import prepare, resolve_corpus  # noqa: E402
from minigpt.errors import cli_main  # noqa: E402
from minigpt.tokenizers import TiktokenTokenizer  # noqa: E402


def default_corpus() -> str | None:
    """The shared Tiny Shakespeare when there is no input.txt here; None lets resolve_corpus decide."""
    if not (HERE / "input.txt").exists() and SHARED_SHAKESPEARE.is_file():
        return str(SHARED_SHAKESPEARE)
    return None


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of Tiny Shakespeare")
    parser.add_argument("--out-dir", default=str(HERE), help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)

    tokenizer = TiktokenTokenizer("gpt2")  # first: a missing vocabulary fails before any reading
    text, source = resolve_corpus(args.data or default_corpus(), download_dir=HERE)
    print(f"corpus: {source}")
    print(f"length of dataset in characters: {len(text):,}")
    meta = prepare(text, tokenizer, args.out_dir)
    print(f"train has {meta['train_tokens']:,} tokens ({meta['train_chars']:,} characters)")
    print(f"val has {meta['val_tokens']:,} tokens ({meta['val_chars']:,} characters)")
    print(f"wrote train.bin, val.bin and meta.json ({meta['dtype']}, vocab {meta['vocab_size']:,}) to {args.out_dir}")


if __name__ == "__main__":
    main()
