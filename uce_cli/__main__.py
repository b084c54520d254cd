"""Entry point for ``python -m uce_cli`` and the ``uce`` script; a Ctrl-C while the CLI loads exits 130."""

import sys


def run() -> None:
    """Load the CLI and run it; Ctrl-C before its own handler is in place is an interruption too."""
    try:
        from uce_cli.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
