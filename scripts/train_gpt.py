"""Train a GPT language model: the same command as `minigpt train` (see --help, or minigpt/cli.py).

python scripts/train_gpt.py                                  # Tiny Shakespeare, characters
python scripts/train_gpt.py --data my.txt --max-iters 500    # any UTF-8 text
"""

import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.cli import train as main  # noqa: E402

if __name__ == "__main__":
    main(prog="train_gpt.py")
