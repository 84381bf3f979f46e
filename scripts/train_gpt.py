"""Train a GPT language model (defaults: nanoGPT's CPU Shakespeare run, about 0.8M parameters).

    python scripts/train_gpt.py                                  # Tiny Shakespeare, characters
    python scripts/train_gpt.py --data my.txt --max-iters 500    # any UTF-8 text
    python scripts/train_gpt.py --config run.toml --n-layer 6    # TOML sets defaults, flags win
    python scripts/train_gpt.py --resume                         # continue out/last.npz

Writes out_dir/ckpt.npz (best val loss), out_dir/last.npz (latest) and out_dir/metrics.jsonl; an
out-dir holds one run (a new run there needs --overwrite) and is locked while it trains. Ctrl-C or
SIGTERM saves last.npz and exits 130/143; --resume continues from it with nothing else needed.
Sample with scripts/sample.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import config
from minigpt.errors import Interrupted, UserError, cli_main
from minigpt.lm import RunConfig, train_lm


def build_parser() -> argparse.ArgumentParser:
    """Every RunConfig setting as a flag; help text, types and defaults come from its declaration."""
    parser = config.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML file of settings (keys as the flags, with underscores)"
    )
    config.add_arguments(parser, RunConfig)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file, each strictly of its declared type."""
    try:
        return config.read_toml(path, RunConfig)
    except ImportError:
        raise UserError("--config needs Python 3.11+ or `pip install tomli`") from None
    except config.InvalidSetting as e:
        raise UserError(f"--config {path}: {e}; see --help for the settings") from None
    except OSError as e:
        raise UserError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # tomllib.TOMLDecodeError, UnicodeDecodeError
        raise UserError(f"--config: {path} is not valid TOML ({str(e).splitlines()[0]})") from None


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    settings = read_config_file(config_path) if config_path else {}
    settings.update(args)  # explicit flags win over the file
    try:
        cfg = config.from_flat(RunConfig, settings)
        summary = train_lm(cfg, explicit=set(settings))
    except config.InvalidSetting as e:
        raise UserError(f"{config.flag(e.name)} {e.problem}") from None
    except KeyboardInterrupt:  # before training started (data preparation): nothing to save
        raise Interrupted("\ninterrupted before training started; nothing was saved", signal.SIGINT) from None
    if summary.interrupted:  # Ctrl-C or SIGTERM: last.npz was saved; exit 130 or 143
        raise Interrupted(summary.message, summary.stop_signal or signal.SIGINT)
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
