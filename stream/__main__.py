"""`python -m stream` and the `emloc-stream` program: `stream.cli.main` in a process of its own."""

import sys

from .signals import INTERRUPTED, exit_after_signal, handle_stop_signals, signal_received


def run() -> None:
    handle_stop_signals()  # first: a Ctrl-C while the command's modules load ends it in one line too
    try:
        from .cli import main

        code = main()
    except Exception:
        if not signal_received():
            raise
        print(INTERRUPTED, file=sys.stderr)  # an interrupt inside a library's import, surfacing as its error
        code = 130
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        code = 130
    exit_after_signal(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
