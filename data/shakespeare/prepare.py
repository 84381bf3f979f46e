"""Prepare Tiny Shakespeare with the GPT-2 BPE tokenizer (tiktoken), as nanoGPT's data/shakespeare.

    python data/shakespeare/prepare.py                # Tiny Shakespeare (see below)
    python data/shakespeare/prepare.py --data my.txt  # any UTF-8 text file instead

The text is input.txt here if present, else a download (offline: Python standard-library source, as
train_gpt.py). The GPT-2 vocabulary files come from tiktoken's cache (TIKTOKEN_CACHE_DIR) or a download;
offline, the error names them. Writes train.bin, val.bin (uint16 token ids) and meta.json next to this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    import minigpt  # noqa: F401  (normally installed with `pip install -e .`)
except ImportError:  # running from a plain checkout: make the repository root importable
    sys.path.insert(0, str(HERE.parent.parent))

from minigpt.data import prepare, resolve_corpus  # noqa: E402
from minigpt.errors import cli_main  # noqa: E402
from minigpt.tokenizers import TiktokenTokenizer  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of Tiny Shakespeare")
    parser.add_argument("--out-dir", default=str(HERE), help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)

    tokenizer = TiktokenTokenizer("gpt2")  # first: a missing vocabulary fails before any reading
    text, source = resolve_corpus(args.data, download_dir=HERE)
    print(f"corpus: {source}")
    print(f"length of dataset in characters: {len(text):,}")
    meta = prepare(text, tokenizer, args.out_dir)
    print(f"train has {meta['train_tokens']:,} tokens ({meta['train_chars']:,} characters)")
    print(f"val has {meta['val_tokens']:,} tokens ({meta['val_chars']:,} characters)")
    print(f"wrote train.bin, val.bin and meta.json ({meta['dtype']}, vocab {meta['vocab_size']:,}) to {args.out_dir}")


if __name__ == "__main__":
    main()
