"""`python -m minigpt train|sample|plot|bench ...` (see minigpt/cli.py)."""

from minigpt.cli import main

main()
