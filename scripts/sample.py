"""Sample text from a trained GPT checkpoint, streaming it to stdout as it is generated.

python scripts/sample.py                                   # out/ckpt.npz, prompt "\\n"
python scripts/sample.py --start "ROMEO:" --num-samples 3 --temperature 0.8 --top-k 40
python scripts/sample.py --ckpt out/last.npz --start FILE:prompt.txt --temperature 0   # greedy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.data import read_text_file
from minigpt.errors import UserError, cli_main
from minigpt.lm import load_model, sample_text


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="out", help="read out_dir/ckpt.npz (default: out)")
    parser.add_argument("--ckpt", help="a checkpoint file (overrides --out-dir)")
    parser.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from (default "\\n")')
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be positive")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "ckpt.npz"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train first (scripts/train_gpt.py) or pass --ckpt FILE")
    start = read_text_file(args.start[5:]) if args.start.startswith("FILE:") else args.start
    try:
        model, tokenizer, _ = load_model(path, device=args.device)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    tokenizer.encode(start)  # characters outside the vocabulary fail here, before any output
    for i in range(args.num_samples):
        sys.stdout.write(start)
        sample_text(
            model,
            tokenizer,
            start,
            args.max_new_tokens,
            stream=sys.stdout,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + i,
        )
        sys.stdout.write("\n---------------\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
