"""Sample text from a trained GPT checkpoint: the same command as `minigpt sample` (see --help, or minigpt/cli.py).

python scripts/sample.py --start "ROMEO:" --num-samples 3 --top-k 40
"""

import sys
from pathlib import Path

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.cli import sample as main  # noqa: E402

if __name__ == "__main__":
    main(prog="sample.py")
