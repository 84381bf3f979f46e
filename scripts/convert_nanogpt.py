"""Convert between nanoGPT's checkpoints and minigpt's (the direction follows the input file).

    python scripts/convert_nanogpt.py out-shakespeare-char/ckpt.pt out/ckpt.npz --meta data/shakespeare_char/meta.pkl
    python scripts/convert_nanogpt.py out/ckpt.npz nanogpt-out/     # writes ckpt.pt (+ meta.pkl for characters)

nanoGPT -> minigpt keeps the weights, vocabulary, iteration and best val loss (not the optimizer state):
sample it with `sample.py --ckpt`, fine-tune it with `train_gpt.py --init-from`. Needs PyTorch (pip install torch).
Without --meta, meta.pkl is looked for beside ckpt.pt and in nanoGPT's data/<dataset>/.
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
from minigpt.nanogpt import minigpt_to_nanogpt, nanogpt_to_minigpt


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="nanoGPT ckpt.pt, or a minigpt .npz checkpoint")
    parser.add_argument("dest", help="minigpt .npz to write, or a folder for nanoGPT's ckpt.pt (+ meta.pkl)")
    parser.add_argument("--meta", help="nanoGPT's meta.pkl of a character vocabulary (nanoGPT -> minigpt)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if source.suffix == ".pt":
        print(f"wrote {nanogpt_to_minigpt(source, args.dest, args.meta)}")
    elif source.suffix == ".npz":
        if args.meta:
            raise UserError("--meta is for nanoGPT -> minigpt; minigpt -> nanoGPT writes meta.pkl itself")
        print("wrote " + ", ".join(str(p) for p in minigpt_to_nanogpt(source, args.dest)))
    else:
        raise UserError(f"{source}: expected nanoGPT's .pt or minigpt's .npz checkpoint")


if __name__ == "__main__":
    main()
