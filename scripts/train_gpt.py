"""Train a GPT language model (defaults: nanoGPT's CPU Shakespeare run, about 0.8M parameters).

    python scripts/train_gpt.py                                  # Tiny Shakespeare, characters
    python scripts/train_gpt.py --data my.txt --max-iters 500    # any UTF-8 text
    python scripts/train_gpt.py --config run.toml --n-layer 6    # TOML sets defaults, flags win
    python scripts/train_gpt.py --resume                         # continue out/last.npz

Writes out_dir/ckpt.npz (best val loss), out_dir/last.npz (latest) and out_dir/metrics.jsonl.
Ctrl-C saves last.npz and exits; sample with scripts/sample.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.errors import UserError, cli_main
from minigpt.lm import RUN_FIELDS, RunConfig, train_lm

HELP = {
    "data": "UTF-8 text file to train on (default: Tiny Shakespeare; offline: Python's own sources)",
    "out_dir": "where checkpoints, token files and metrics.jsonl go",
    "tokenizer": "char, bpe (trained here) or gpt2 (tiktoken)",
    "vocab_size": "vocabulary size for --tokenizer bpe",
    "max_iters": "total optimizer steps",
    "eval_interval": "evaluate (and checkpoint) every N steps",
    "eval_iters": "batches per evaluation",
    "log_interval": "log the training loss every N steps",
    "lr_decay_iters": "cosine decay length (0: max_iters)",
    "grad_clip": "clip the global gradient norm (0: off)",
    "grad_accum": "micro-batches per optimizer step",
    "device": "cpu or cuda",
    "resume": "continue from out_dir/last.npz (model, optimizer, step, RNG state)",
    "sample_tokens": "length of the sample printed at the end (0: none)",
    "quiet": "no progress output",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--config", help="TOML file of settings (keys as below, dashes or underscores)")
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"{HELP.get(field.name, field.name.replace('_', ' '))} (default: {default})"
        if isinstance(default, bool):
            action = "store_true" if field.name in ("resume", "quiet") else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, metavar=field.name.upper(), help=help_text)
    return parser


def read_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("--config needs Python 3.11+ or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config: no such file {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config: {path} is not valid TOML ({e})") from None
    settings = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(settings) - RUN_FIELDS)
    if unknown:
        raise UserError(f"--config: unknown setting(s) {', '.join(unknown)} in {path}; see --help for the names")
    return settings


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    settings = read_toml(config_path) if config_path else {}
    settings.update(args)  # explicit flags win over the file
    defaults = dataclasses.asdict(RunConfig())
    for key, value in settings.items():  # a TOML value must have the flag's type
        expected = type(defaults[key]) if defaults[key] is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            settings[key] = float(value)
        elif not isinstance(settings[key], expected):
            raise UserError(f"--config: {key} must be a {expected.__name__}, got {value!r}")
    cfg = RunConfig(**settings)
    try:
        summary = train_lm(cfg, explicit=set(settings))
    except KeyboardInterrupt:  # before training started (data preparation): nothing to save
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        return
    if summary.interrupted:
        return
    if summary.val_loss is not None:
        print(
            f"done: step {summary.step}, val loss {summary.val_loss:.4f} (best {summary.best_val_loss:.4f}), "
            f"val {summary.val_bpc:.3f} bits/char, {summary.elapsed:.1f} s, {summary.tokens_per_s:,.0f} tokens/s"
        )
    if summary.sample:
        print("--- sample ---")
        print(summary.sample)


if __name__ == "__main__":
    main()
