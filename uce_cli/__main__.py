"""Entry point for ``python -m uce_cli`` and the ``uce`` script; a Ctrl-C while the CLI loads exits 130."""

import sys


def run() -> None:
    """Load the CLI and run it; a Ctrl-C while it loads is an interruption too."""
    from uce_cli.interrupt import watch_sigint

    watch_sigint()  # first: a Ctrl-C from here on is reported as an interruption, whatever it breaks
    try:
        from uce_cli.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
