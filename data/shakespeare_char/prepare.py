"""Prepare a character-level corpus (Tiny Shakespeare by default), as nanoGPT's shakespeare_char.

    python data/shakespeare_char/prepare.py               # input.txt here, downloaded if missing
    python data/shakespeare_char/prepare.py --data my.txt # any UTF-8 text file instead

Writes train.bin, val.bin (uint16 token ids) and meta.json (vocabulary, counts) next to this file.
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
from minigpt.tokenizers import CharTokenizer  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to use instead of Tiny Shakespeare")
    parser.add_argument("--out-dir", default=str(HERE), help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)

    text, source = resolve_corpus(args.data, download_dir=HERE)
    print(f"corpus: {source}")
    tokenizer = CharTokenizer.from_text(text)
    print(f"length of dataset in characters: {len(text):,}")
    print(f"vocab size: {tokenizer.vocab_size:,}")
    meta = prepare(text, tokenizer, args.out_dir)
    print(f"train has {meta['train_tokens']:,} tokens ({meta['train_chars']:,} characters)")
    print(f"val has {meta['val_tokens']:,} tokens ({meta['val_chars']:,} characters)")
    print(f"wrote train.bin, val.bin and meta.json ({meta['dtype']}) to {args.out_dir}")


if __name__ == "__main__":
    main()
