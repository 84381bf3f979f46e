"""The `minigpt` command (also `python -m minigpt`): train, sample, plot, bench.

    minigpt train --data input.txt --max-iters 500     # scripts/train_gpt.py
    minigpt sample --start "ROMEO:" --num-samples 2    # scripts/sample.py
    minigpt plot out                                   # out/loss.png from out/metrics.jsonl
    minigpt bench --preset S --vs-torch                # scripts/bench_train.py

scripts/train_gpt.py and scripts/sample.py are thin front ends to `train` and `sample` here. Every
command reads nanoGPT's spellings too: `--max_iters=10` is `--max-iters 10`, `--bias=False` is
`--no-bias`. `--config FILE` is a TOML file of settings wherever it appears.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt import config
from minigpt.config import setting
from minigpt.data import read_text_file
from minigpt.errors import Interrupted, UserError, cli_main, signal_of


class Parser(config.ArgumentParser):
    """Bad flags are one line and exit 2 (via cli_main); nanoGPT's `--key_name=value` spellings work."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._dashed(args), namespace)

    def _dashed(self, args: list[str]) -> list[str]:
        """--max_iters=10 -> --max-iters=10; --bias=False -> --no-bias for an on/off setting."""
        switches = {s for a in self._actions if isinstance(a, argparse.BooleanOptionalAction) for s in a.option_strings}
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            if arg.startswith("--"):
                key, eq, value = arg.partition("=")
                key = "--" + key[2:].replace("_", "-")
                if eq and key in switches and value.lower() in ("true", "false"):
                    arg = key if value.lower() == "true" else "--no-" + key[2:]
                else:
                    arg = key + eq + value
            out.append(arg)
        return out


def settings_parser(cls: type, prog: str | None, doc: str) -> Parser:
    """A parser with `--config FILE` and one flag per setting of `cls` (help and defaults from its declaration)."""
    parser = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="TOML file of settings (keys as the flags, with underscores); flags given here win",
    )  # fmt: skip
    config.add_arguments(parser, cls)
    return parser


def read_settings(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The settings the user gave: the --config file's, then the flags' (which win)."""
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    settings = {}
    if path:
        try:
            settings = config.read_toml(path, cls)
        except ImportError:
            raise UserError("--config needs Python 3.11+ or `pip install tomli`") from None
        except config.InvalidSetting as e:
            raise UserError(f"--config {path}: {e}; see --help for the settings") from None
        except OSError as e:
            raise UserError(f"--config: cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:  # tomllib.TOMLDecodeError, UnicodeDecodeError
            raise UserError(f"--config: {path} is not valid TOML ({str(e).splitlines()[0]})") from None
    settings.update(args)
    return settings


def build(cls: type, settings: dict[str, Any]) -> Any:
    try:
        return config.from_flat(cls, settings)
    except config.InvalidSetting as e:
        raise UserError(f"{config.flag(e.name)} {e.problem}") from None


# ----------------------------------------------------------------------------- train

TRAIN_DOC = """Train a GPT language model (defaults: nanoGPT's CPU Shakespeare run, about 0.8M parameters).

    minigpt train                                  # Tiny Shakespeare (offline: Python's own sources), characters
    minigpt train --data my.txt --max-iters 500    # any UTF-8 text
    minigpt train --config run.toml --n-layer 6    # TOML sets defaults, flags win
    minigpt train --resume                         # continue out/last.npz
    minigpt train --data-dir data/big              # token files from scripts/prepare.py (any corpus size)
    mpiexec -n 4 minigpt train --data-dir data/big # 4 data-parallel ranks (pip install -e ".[mpi]")

Writes out_dir/ckpt.npz (best val loss), last.npz (latest), metrics.jsonl, data/ (token files) and,
with matplotlib, loss.png. An out-dir holds one run (a new run there needs --overwrite) and is locked
while it trains. Ctrl-C or SIGTERM saves last.npz and exits 130/143; --resume continues from it.
Sample with `minigpt sample`. (scripts/train_gpt.py is the same command.)
"""


@cli_main
def train(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`minigpt train`: every RunConfig setting is a flag."""
    from minigpt import distributed
    from minigpt.lm import RunConfig, train_lm

    settings = read_settings(RunConfig, settings_parser(RunConfig, prog, TRAIN_DOC), argv)
    try:
        with distributed.session() as dist:  # under mpiexec: this process is one of the ranks
            cfg = dist.main_first(lambda: build(RunConfig, settings))  # a bad setting: one line, from rank 0
            dist.claim_device(cfg.device)
            summary = train_lm(cfg, explicit=set(settings))
    except config.InvalidSetting as e:
        raise UserError(f"{config.flag(e.name)} {e.problem}") from None
    except KeyboardInterrupt as e:  # before training started (data preparation): nothing to save
        signum = signal_of(e)
        lead = "\n" if signum == signal.SIGINT else ""  # after the terminal's ^C
        raise Interrupted(
            f"{lead}interrupted by {signal.Signals(signum).name} before training started; nothing was saved", signum
        ) from None
    if not dist.is_main:  # data parallel: rank 0 reports
        return
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


# ----------------------------------------------------------------------------- sample

SAMPLE_DOC = """Sample text from a trained GPT checkpoint, streaming it to stdout as it is generated.

    minigpt sample                                   # out/ckpt.npz (or out/last.npz), prompt "\\n"
    minigpt sample --start "ROMEO:" --num-samples 3 --temperature 0.8 --top-k 40
    minigpt sample --ckpt out/last.npz --start FILE:prompt.txt --temperature 0   # greedy
    minigpt sample --init-from gpt2 --start "Hello, I'm a language model,"     # GPT-2 (Hugging Face files)

(scripts/sample.py is the same command.)
"""


@dataclass
class SampleConfig:
    """The settings of `minigpt sample`, declared once: the flags and their checks come from here."""

    out_dir: str = setting("out", "the run's out-dir: its ckpt.npz, else its last.npz")
    ckpt: str | None = setting(None, "a checkpoint file (overrides --out-dir)")
    init_from: str | None = setting(
        None, "sample other weights: nanoGPT's ckpt.pt, or a Hugging Face GPT-2 folder or name (gpt2)"
    )
    start: str = setting("\n", "prompt text, or FILE:path to read it from")
    num_samples: int = setting(1, "samples to draw", low=0, low_open=True)
    max_new_tokens: int = setting(500, "tokens per sample", low=0, low_open=True)
    temperature: float = setting(0.8, "softmax temperature; 0 = greedy", low=0)
    top_k: int | None = setting(None, "sample from the k most likely tokens only (default: all)", low=0, low_open=True)
    top_p: float | None = setting(
        None, "sample from the most likely tokens holding this probability (default: 1)", low=0, high=1, low_open=True
    )
    seed: int = setting(1337, "seed of the first sample (the i-th uses seed + i)", low=0)
    device: str = setting("cpu", "cpu or cuda")

    def __post_init__(self) -> None:
        config.check_fields(self)


@cli_main
def sample(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`minigpt sample`: stream samples from a checkpoint to stdout."""
    from minigpt.inference import find_checkpoint, load_model, sample_text

    args = build(SampleConfig, read_settings(SampleConfig, settings_parser(SampleConfig, prog, SAMPLE_DOC), argv))
    if args.init_from:
        path, note = args.init_from, ""  # a file, folder or model name: load_model tells what is missing
    elif args.ckpt:
        path, note = find_checkpoint(args.ckpt)
    elif not Path(args.out_dir).is_dir():
        raise UserError(f"no checkpoint: no out-dir {args.out_dir}; train first (minigpt train) or pass --ckpt FILE")
    else:
        path, note = find_checkpoint(args.out_dir)
    if note:
        print(f"note: {note}", file=sys.stderr)
    start = read_text_file(args.start[5:]) if args.start.startswith("FILE:") else args.start
    try:
        model, tokenizer, _ = load_model(path, device=args.device)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    tokenizer.encode(start)  # characters outside the vocabulary fail here, before any output
    for i in range(args.num_samples):
        sys.stdout.write(start)
        sample_text(
            model, tokenizer, start, args.max_new_tokens, stream=sys.stdout, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed + i,
        )  # fmt: skip
        sys.stdout.write("\n---------------\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- plot, bench

PLOT_DOC = """Draw a run's loss curves (train and val loss, tokens seen, learning rate) from its metrics.jsonl.

    minigpt plot            # out/metrics.jsonl -> out/loss.png
    minigpt plot runs/a --output a.png

Training draws out_dir/loss.png itself at each evaluation when matplotlib is installed (the plot extra).
"""


@cli_main
def plot(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`minigpt plot [OUT_DIR]`: write OUT_DIR/loss.png."""
    from minigpt.plot import plot_run

    parser = Parser(prog=prog, description=PLOT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="out", help="the run's out-dir (default: out)")
    parser.add_argument("--output", metavar="FILE", help="where the PNG goes (default: OUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_run(args.out_dir, args.output)}")


def bench(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`minigpt bench`: time training steps (minigpt/bench.py)."""
    from minigpt.bench import main  # here, not at the top: minigpt.bench imports this module

    main(argv, prog=prog)


COMMANDS = {
    "train": (train, "train a GPT (scripts/train_gpt.py)"),
    "sample": (sample, "generate text from a checkpoint (scripts/sample.py)"),
    "plot": (plot, "draw out/loss.png from out/metrics.jsonl"),
    "bench": (bench, "time training steps, optionally against PyTorch (scripts/bench_train.py)"),
}


def main(argv: list[str] | None = None) -> None:
    """`minigpt COMMAND ...`: the entry point of the console script and of `python -m minigpt`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: minigpt {train,sample,plot,bench} [--help] ...\n\ncommands:\n" + "\n".join(lines))
        print("\n`minigpt COMMAND --help` lists a command's flags, with their defaults.")
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from minigpt import __version__

        print(f"minigpt {__version__}")
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    command, _ = COMMANDS[argv[0]]
    command(argv[1:], prog=f"minigpt {argv[0]}")
