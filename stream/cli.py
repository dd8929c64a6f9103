"""The `emloc-stream` command: the parser and error reporting; each command lives in `stream/commands/`."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import batch, demo, live, pack, run
from .commands.common import add_max_new_tokens_option
from .engine import DEFAULT_MODEL, RANDOM_MODEL, ROOT
from .signals import INTERRUPTED, signal_received


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each command module adds its own (`register`)."""
    parser = argparse.ArgumentParser(prog="emloc-stream", description="Answer questions about long or endless "
                                     "video with an EMLoC-pruned multimodal LLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (see configs/); default: configs/default.yaml, the "
                       "query-agnostic default with layer groups of half the model's layers")
        p.add_argument("--model", help=f"checkpoint folder or hub id of a supported model (docs/models.md) "
                       f"(default: the config's model.path, else the shipped {DEFAULT_MODEL.relative_to(ROOT)}; "
                       f"{RANDOM_MODEL}: random weights)")
        p.add_argument("--ask", action="append", help="a question (repeatable)")
        p.add_argument("--budget", type=int, help="hard cap of tokens per layer (default: the config's "
                       "emloc.token_budget, none)")
        add_max_new_tokens_option(p)

    for command in (demo, run, batch, live, pack):
        command.register(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)  # inside: Ctrl-C while the commands' modules load
        return args.run(args)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as error:
        if signal_received():  # an interrupt inside a library, surfacing as its error (stream/signals.py)
            print(INTERRUPTED, file=sys.stderr)
            return 130
        if not isinstance(error, reported_errors()):
            raise
        print(f"emloc-stream: error: {error}", file=sys.stderr)
        return 2


def reported_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line (exit status 2) instead of a traceback: ValueError covers
    ConfigError, SettingsError, InputError, UnsupportedModelError, PackError and BindError. Imported
    here, once a command has failed, because stream.state imports torch."""
    from .sources import VideoError
    from .state import StateError

    return ValueError, VideoError, StateError


if __name__ == "__main__":
    sys.exit(main())
