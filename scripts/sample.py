"""Sample text from a trained GPT checkpoint, streaming it to stdout as it is generated.

python scripts/sample.py                                   # out/ckpt.npz, prompt "\\n"
python scripts/sample.py --start "ROMEO:" --num-samples 3 --temperature 0.8 --top-k 40
python scripts/sample.py --ckpt out/last.npz --start FILE:prompt.txt --temperature 0   # greedy
python scripts/sample.py --init-from gpt2 --start "Hello, I'm a language model,"   # GPT-2 (Hugging Face files)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import dataclass

from minigpt import config
from minigpt.config import setting
from minigpt.data import read_text_file
from minigpt.errors import UserError, cli_main
from minigpt.lm import load_model, sample_text


@dataclass
class SampleConfig:
    """The settings of sample.py, declared once: the flags and their checks come from here."""

    out_dir: str = setting("out", "read out_dir/ckpt.npz")
    ckpt: str | None = setting(None, "a checkpoint file (overrides --out-dir)")
    init_from: str | None = setting(
        None, "sample other weights: nanoGPT's ckpt.pt, or a Hugging Face GPT-2 folder or name (gpt2)"
    )
    start: str = setting("\n", "prompt text, or FILE:path to read it from")
    num_samples: int = setting(1, "samples to draw", low=0, low_open=True)
    max_new_tokens: int = setting(500, "tokens per sample", low=0, low_open=True)
    temperature: float = setting(0.8, "softmax temperature; 0 = greedy", low=0)
    top_k: int | None = setting(None, "sample from the k most likely tokens only", low=0, low_open=True)
    top_p: float | None = setting(
        None, "sample from the most likely tokens holding this probability", low=0, high=1, low_open=True
    )
    seed: int = setting(1337, "seed of the first sample (the i-th uses seed + i)", low=0)
    device: str = setting("cpu", "cpu or cuda")

    def __post_init__(self) -> None:
        config.check_fields(self)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = config.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, SampleConfig)
    try:
        args = SampleConfig(**vars(parser.parse_args(argv)))
    except config.InvalidSetting as e:
        raise UserError(f"{config.flag(e.name)} {e.problem}") from None
    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "ckpt.npz"
    if args.init_from:
        path = args.init_from  # a file, folder or model name: load_model tells what is missing
    elif not path.exists():
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
