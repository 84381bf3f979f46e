"""Tokenize a corpus of any size into train.bin/val.bin + meta.json, for `train_gpt.py --data-dir`.

    python scripts/prepare.py corpus.txt --out-dir data/mine                    # one file, characters
    python scripts/prepare.py corpus/ --tokenizer gpt2 --out-dir data/mine      # a folder of text files
    python scripts/prepare.py 'books/**/*.txt' --tokenizer gpt2 --out-dir data/books   # a glob (quoted)

Streams the text in chunks through worker processes, so memory stays bounded whatever the corpus
size. Ctrl-C keeps the finished chunks: rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.errors import cli_main, signal_of
from minigpt.prepare import CHUNK_BYTES, TOKENIZER_CHOICES, default_workers, prepare_corpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="+", help="UTF-8 text file(s), folder(s) or glob(s), in this order")
    parser.add_argument("--out-dir", required=True, help="where train.bin, val.bin and meta.json go")
    parser.add_argument("--tokenizer", default="char", choices=TOKENIZER_CHOICES, help="(default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=512, help="for --tokenizer bpe (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the bytes for val (default: 0.1)")
    parser.add_argument("--workers", type=int, help=f"processes (default: {default_workers()}; 1 below 32 MB of text)")
    parser.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / 2**20, help="text per task (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace token files prepared from other input")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare_corpus(
            args.source,
            args.out_dir,
            args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            workers=args.workers,
            chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: finished chunks are kept in {args.out_dir}; rerun the same command to continue")
        sys.exit(128 + signal_of(e))
    print(
        f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['dtype']}), "
        f"vocab {meta['vocab_size']:,}, from {meta['source_bytes'] / 2**20:,.1f} MB of text"
    )


if __name__ == "__main__":
    main()
