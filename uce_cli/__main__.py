"""Entry point for ``python -m uce_cli``."""

from uce_cli.cli import main

main()
