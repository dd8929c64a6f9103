"""The engine: builds the model, its settings and task packs, and checks inputs before any work.

Every entry point calls it: the CLI commands (`stream/commands/`), the HTTP and MQTT services,
the Ray workers and the benchmarks. It knows nothing of argparse or printing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from emloc import EMLoCSettings, InputError

from .config import Config
from .models import DEFAULT_MODEL

if TYPE_CHECKING:  # the model code (torch, transformers) is imported where a model is built, not here
    from emloc import ModelAdapter, TaskPack

ROOT = Path(__file__).resolve().parents[1]
RANDOM_MODEL = "builtin:random"  # a 28-layer tiny Qwen2-VL with random weights, for quick checks


def build_model(config: Config, model: str | None = None) -> tuple[ModelAdapter, EMLoCSettings, str]:
    """The model (`model`, else the config's model.path: a checkpoint folder or hub id; else the shipped
    model; or the random built-in one), the settings every stream of it folds with (the config's
    `emloc:`, resolved against the model's depth), and a label for both.

    Without a config file, `Config()`: the default of configs/default.yaml, the paper's online search
    with layer groups of half the model's layers (14 of Qwen2-VL-7B's 28).
    """
    options = dict(fps=config.model.fps, max_frame_pixels=config.model.max_frame_pixels)
    name = model_name(config, model)
    check_model(name)
    if name == RANDOM_MODEL:
        from emloc.adapters import adapter_for
        from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        adapter = adapter_for(tiny_qwen2_vl(tokenizer, layers=28, hidden=64, init_std=0.1), tokenizer, **options)
        label = "built-in tiny Qwen2-VL (random weights: its answers mean nothing)"
    else:
        from transformers.utils import logging as hf_logging

        from emloc import load_adapter

        hf_logging.disable_progress_bar()  # "Loading weights" bars: the commands print their own progress
        try:
            adapter = load_adapter(name, device=config.model.device, **options)
        except OSError as error:  # transformers: not on the hub, hub unreachable, files missing
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"model {name}: no such folder here, and it cannot be loaded from the hub: {first}") \
                from error
        label = name if Path(name) != DEFAULT_MODEL else f"{DEFAULT_MODEL.relative_to(ROOT)} (shipped, trained here)"
    settings = config.emloc.for_model(adapter.num_layers, adapter.temporal_patch)  # before any video is read
    return adapter, settings, f"{label}, {adapter.num_layers} layers; {describe(settings)}"


_PACKS: dict[Path, TaskPack] = {}  # one pack per file per process, shared read-only by every stream


def load_task(path: str | Path | None) -> TaskPack | None:
    """Reads a task pack once per process (PackError naming the problem); every stream shares it."""
    if path is None:
        return None
    key = Path(path).expanduser().resolve()
    if key not in _PACKS:
        from emloc import TaskPack

        _PACKS[key] = TaskPack.load(key)
    return _PACKS[key]


def check_task(path, pack: TaskPack | None, adapter: ModelAdapter, settings: EMLoCSettings) -> None:
    """Refuses, before any video is read, a pack this model and these settings cannot start from:
    another model, another system prompt, or a token budget the pack alone fills."""
    from emloc import SettingsError, StreamContext

    if pack is None:
        return
    try:
        StreamContext(adapter, settings=settings, task=pack)
    except SettingsError as error:
        raise SettingsError(f"task pack {path}: {error}") from error


def model_name(config: Config, model: str | None = None) -> str:
    """The model a command runs: `model` (--model), else the config's model.path, else the shipped one."""
    return model or config.model.path or str(DEFAULT_MODEL)


def check_model(name: str) -> None:
    """A model that cannot be one, named before any work: a missing folder, a file, a folder without config.json."""
    if name == RANDOM_MODEL:
        return
    if Path(name) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir():
        raise InputError(f"the shipped model is missing at {DEFAULT_MODEL}; pass --model PATH_OR_ID")
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
    """A state folder that cannot be written, or whose saved state is damaged or from another version,
    named before any work (the folder is created if missing)."""
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
    from .state import check_saved, has_state

    if has_state(folder):
        check_saved(folder)


def check_output(path: str | Path | None, option: str) -> None:
    """A file answers are appended to that cannot be written, named before any work (its folder is
    created if missing, as the answers' sink would)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: a folder, not a file")
    above = next(folder for folder in path.absolute().parents if folder.exists())
    if not above.is_dir():
        raise InputError(f"{option} {path}: {above} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as error:
        raise InputError(f"{option} {path}: cannot write there: {error.strerror or error}") from error


def describe(s: EMLoCSettings) -> str:
    return (f"layer groups of {s.layer_group_size}, delta {s.delta}, "
            f"ratios {list(s.ratios)}, {s.chunk_frames} frames a chunk"
            + (f", budget {s.token_budget}/layer" if s.token_budget else "")
            + (f", probe observer with its own answer (up to {s.probe_answer_tokens} tokens)"
               if s.probe_answer_tokens else ""))


def print_model_note(note: str | None) -> None:
    """The line under a command's first one when the checkpoint says what it is (`ModelAdapter.model_note`; the
    shipped models: synthetic video only, and --model for real footage); nothing for a checkpoint that does not."""
    if note:
        print(f"model note: {note}", flush=True)
