"""What every command shares: its options, the config it reads, progress lines, delivering answers."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config import MAX_NEW_TOKENS, Config, load_config

if TYPE_CHECKING:
    from emloc import StreamContext


def add_task_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="a task pack (emloc-stream pack) the stream starts from: the model answers in "
                   "its examples' terms; the video folds after it (default: the config's task:, else none)")


def task_path(args: argparse.Namespace, config: Config) -> str | None:
    """The pack a command's streams start from: --task, else the config's top-level task:."""
    return getattr(args, "task", None) or config.task


def config_from(args: argparse.Namespace) -> Config:
    """The config a command runs with: --config (else the default, `Config()`: configs/default.yaml), the
    command line's options over it. Options the config also holds default to None, so the config fills
    them in: --budget (emloc.token_budget), --max-new-tokens (model.max_new_tokens)."""
    config = load_config(args.config) if args.config else Config()
    if getattr(args, "budget", None) is not None:
        config = replace(config, emloc=replace(config.emloc, token_budget=args.budget))
    if getattr(args, "max_new_tokens", None) is not None:
        config = replace(config, model=replace(config.model, max_new_tokens=args.max_new_tokens))
    args.max_new_tokens = config.model.max_new_tokens
    return config


def add_max_new_tokens_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, help=f"longest answer in tokens (default: the config's "
                   f"model.max_new_tokens, {MAX_NEW_TOKENS})")


def deliver(context: StreamContext, stream_id: str, questions: list[str], answers, expected=None) -> int:
    from sinks import AnswerEvent, ConsoleSink

    sink, correct = ConsoleSink(), 0
    for i, (question, answer) in enumerate(zip(questions, answers)):
        truth = expected[i] if expected else None
        correct += truth is not None and answer.text.strip() == truth
        sink.deliver(AnswerEvent(stream_id, f"q{i}", question, answer.text, answer.time_span, time.time(),
                                 answer.cache_tokens, answer.latency_s, expected=truth,
                                 model_note=context.adapter.model_note))
    return correct


def positive_seconds(text: str) -> float:
    """argparse type: a duration in seconds, > 0 (a zero or negative deadline would give up on every start)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def footer(context: StreamContext) -> str:
    seen, kept = context.video_tokens_seen(), context.video_tokens_kept()
    return (f"video tokens seen {seen}, kept {kept:.0f} per layer ({100 * kept / max(seen, 1):.1f}%), "
            f"cache {context.cache.nbytes() / 1024:.0f} KiB")
