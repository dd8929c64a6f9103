"""What every command shares: the model and settings, progress lines, delivering answers, question files."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from pathlib import Path

from emloc import EMLoCSettings, InputError, ModelAdapter, StreamContext, TaskPack

from ..config import Config, load_config
from ..models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
RANDOM_MODEL = "builtin:random"  # a 28-layer tiny Qwen2-VL with random weights, for quick checks
# With no config file, the query-agnostic default of EMLoCSettings (docs/benchmarks/agnostic.md): the probe
# observer carries the model's own answer, tokens ranked by temporal novelty + key diversity, merged.
DEFAULT_PROBE_ANSWER_TOKENS = EMLoCSettings().probe_answer_tokens


def build_model(config: Config, model: str | None, settings_given: bool) -> tuple[ModelAdapter, EMLoCSettings, str]:
    """The model (a checkpoint folder or hub id, the shipped model, or the random built-in one), the
    settings every stream of it folds with, and a label for both.

    Without a config file the paper's online setting is used with its layer groups scaled
    to the model's depth (14 of Qwen2-VL-7B's 28 layers: half the layers per group).
    """
    options = dict(fps=config.model.fps, max_frame_pixels=config.model.max_frame_pixels)
    name = model or config.model.path or str(DEFAULT_MODEL)
    if name == RANDOM_MODEL:
        from emloc.adapters import adapter_for
        from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        adapter = adapter_for(tiny_qwen2_vl(tokenizer, layers=28, hidden=64, init_std=0.1), tokenizer, **options)
        label = "built-in tiny Qwen2-VL (random weights: its answers mean nothing)"
    else:
        from emloc import load_adapter

        if Path(name) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir():
            raise InputError(f"the shipped model is missing at {DEFAULT_MODEL}; pass --model PATH_OR_ID")
        check_model(name)
        try:
            adapter = load_adapter(name, device=config.model.device, **options)
        except OSError as error:  # transformers: not on the hub, hub unreachable, files missing
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"model {name}: no such folder here, and it cannot be loaded from the hub: {first}") \
                from error
        label = name if Path(name) != DEFAULT_MODEL else f"{DEFAULT_MODEL.relative_to(ROOT)} (shipped, trained here)"
    settings = config.emloc
    if not settings_given:  # the product default: the paper's online setting, plus the probe's own answer
        layers = adapter.num_layers
        settings = replace(settings, layer_group_size=layers // 2 if layers % 2 == 0 else 1,
                           probe_answer_tokens=DEFAULT_PROBE_ANSWER_TOKENS)
    settings.check_against(adapter.num_layers, adapter.temporal_patch)  # before any video is read
    return adapter, settings, f"{label}, {adapter.num_layers} layers; {describe(settings)}"


_PACKS: dict[Path, TaskPack] = {}  # one pack per file per process, shared read-only by every stream


def add_task_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="a task pack (emloc-stream pack) the stream starts from: the model answers in "
                   "its examples' terms; the video folds after it (default: the config's task:, else none)")


def task_path(args: argparse.Namespace, config: Config) -> str | None:
    """The pack a command's streams start from: --task, else the config's top-level task:."""
    return getattr(args, "task", None) or config.task


def load_task(path: str | Path | None) -> TaskPack | None:
    """Reads a task pack once per process (PackError naming the problem); every stream shares it."""
    if path is None:
        return None
    key = Path(path).expanduser().resolve()
    if key not in _PACKS:
        _PACKS[key] = TaskPack.load(key)
    return _PACKS[key]


def check_task(path, pack: TaskPack | None, adapter: ModelAdapter, settings: EMLoCSettings) -> None:
    """Refuses, before any video is read, a pack this model and these settings cannot start from:
    another model, another system prompt, or a token budget the pack alone fills."""
    from emloc import SettingsError

    if pack is None:
        return
    try:
        StreamContext(adapter, settings=settings, task=pack)
    except SettingsError as error:
        raise SettingsError(f"task pack {path}: {error}") from error


def check_model(name: str) -> None:
    """A model that cannot be one, named before any work: a missing folder, a file, a folder without config.json."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model {name}: the folder has no config.json; it is not a checkpoint folder")
        return
    if path.exists():
        raise InputError(f"model {name}: a file; give a checkpoint folder or a hub id")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name):  # not a hub id either
        raise InputError(f"model {name}: no such folder")


def check_state(folder: str | Path | None, option: str = "--state") -> None:
    """A state folder that cannot be written, named before any work (the folder is created if missing)."""
    if folder is None:
        return
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder}: a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(f"{option} {folder}: cannot write there: {error.strerror or error}") from error


def config_from(args: argparse.Namespace) -> tuple[Config, bool]:
    config = load_config(args.config) if args.config else Config()
    if args.budget is not None:
        config = replace(config, emloc=replace(config.emloc, token_budget=args.budget))
    return config, bool(args.config)


def describe(s: EMLoCSettings) -> str:
    return (f"layer groups of {s.layer_group_size}, delta {s.delta}, "
            f"ratios {list(s.ratios)}, {s.chunk_frames} frames a chunk"
            + (f", budget {s.token_budget}/layer" if s.token_budget else "")
            + (f", probe observer with its own answer (up to {s.probe_answer_tokens} tokens)"
               if s.probe_answer_tokens else ""))


def progress_printer(total: int | None, duration: float | None = None):
    """Prints each folded chunk: frames so far, and how far through the video."""
    seen = [0]

    def show(record) -> None:
        seen[0] += record.frames
        of = f"/{total}" if total else ""
        done = ""
        if duration and record.time_span:
            done = f" {min(100.0, 100 * record.time_span[1] / duration):5.1f}%"
        print(f"[{seen[0]:>5}{of} frames{done}] {record.summary()}", flush=True)
    return show


def deliver(context: StreamContext, stream_id: str, questions: list[str], answers, expected=None) -> int:
    from sinks import AnswerEvent, ConsoleSink

    sink, correct = ConsoleSink(), 0
    for i, (question, answer) in enumerate(zip(questions, answers)):
        truth = expected[i] if expected else None
        correct += truth is not None and answer.text.strip() == truth
        sink.deliver(AnswerEvent(stream_id, f"q{i}", question, answer.text, answer.time_span, time.time(),
                                 answer.cache_tokens, answer.latency_s, expected=truth))
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


def footer(context: StreamContext) -> str:
    seen, kept = context.video_tokens_seen(), context.video_tokens_kept()
    return (f"video tokens seen {seen}, kept {kept:.0f} per layer ({100 * kept / max(seen, 1):.1f}%), "
            f"cache {context.cache.nbytes() / 1024:.0f} KiB")


def load_questions(path: str | Path) -> list:
    """A questions file: JSON Lines of the question schema (`Question.from_dict`: "id", "question", optional
    "at", "every", "wait") plus optional "video" and "expected"; a line without "id" is `q<line number>`.

    A file with any bad line is refused as a whole, every bad line listed with its number: the
    questions are known before any video is read, so fixing the file costs nothing now, while
    running only the good lines would cost a second pass over every video for the rest later.
    """
    from ..payload import MAX_LINE_BYTES, read_json
    from ..questions import BadQuestion, Question

    ids = set()

    def question(line: str, number: int) -> Question:
        q = Question.from_dict(read_json(line, MAX_LINE_BYTES), "file", new_id=lambda: f"q{number}")
        if q.id in ids:
            raise BadQuestion(f"duplicate id {q.id!r}")
        ids.add(q.id)
        return q

    return parse_lines(Path(path), question, (BadQuestion,), reading="questions",
                       refused="nothing was run", empty="no questions")


def parse_lines(path: Path, parse, errors: tuple[type[Exception], ...], *, reading: str, refused: str,
                empty: str) -> list:
    """Every non-blank line of a JSON Lines file through `parse(line, number)`. A file with any bad
    line (`parse` raised one of `errors`) is refused whole, with an InputError listing every bad line
    by its number and saying what was `refused`; an unreadable file or one with no lines too."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read {reading}: {getattr(error, 'strerror', None) or error}") from error
    out, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(line, number))
        except errors as error:
            problems.append(f"  line {number}: {error}")
    if problems:
        raise InputError(f"{path}: {len(problems)} bad line(s), {refused}:\n" + "\n".join(problems))
    if not out:
        raise InputError(f"{path}: {empty}")
    return out
