"""Export a model's weights: a weights-only minigpt .npz, a Hugging Face GPT-2 folder, or nanoGPT's ckpt.pt.

    python scripts/export.py out/ckpt.npz out/weights.npz              # no optimizer state, tied weight once
    python scripts/export.py out/ckpt.npz hf-model/ --to hf            # config.json + model.safetensors
    python scripts/export.py out/ckpt.npz nanogpt-out/ --to nanogpt    # ckpt.pt (+ meta.pkl); exact GELU only
    python scripts/export.py gpt2 gpt2.npz                             # any source sample.py --init-from takes

The source is anything `load_model` reads: a minigpt .npz, nanoGPT's ckpt.pt, a Hugging Face GPT-2 folder or
a cached model name. --to defaults to npz for a .npz destination, else hf.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.errors import UserError, cli_main
from minigpt.inference import load_model
from minigpt.nanogpt import write_nanogpt
from minigpt.weights import save_hf, save_weights


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a minigpt .npz, nanoGPT's ckpt.pt, or a Hugging Face GPT-2 folder or name")
    parser.add_argument("dest", help="the .npz file or the folder to write")
    parser.add_argument("--to", choices=("npz", "hf", "nanogpt"), help="format (default: npz for *.npz, else hf)")
    args = parser.parse_args(argv)
    to = args.to or ("npz" if args.dest.endswith(".npz") else "hf")
    if to != "npz" and Path(args.dest).suffix == ".npz":
        raise UserError(f"--to {to} writes a folder, not {args.dest}")
    model, tokenizer, meta = load_model(args.source)
    try:
        if to == "npz":
            written = [save_weights(args.dest, model, tokenizer.to_dict(), meta)]
        elif to == "hf":
            save_hf(model, args.dest, tokenizer.to_dict())
            written = [Path(args.dest) / "config.json", Path(args.dest) / "model.safetensors"]
        else:
            written = write_nanogpt(model, tokenizer.to_dict(), args.dest, meta, where=args.source)
    except OSError as e:
        raise UserError(f"cannot write {args.dest}: {e.strerror or e}") from None
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)")


if __name__ == "__main__":
    main()
