"""Saved stream state: the compressed cache as safetensors plus a JSON manifest.

    DIR/manifest.json        format, checksum and size of the cache file, the context's
                             positions/settings/model identity, the stream's state
    DIR/cache-<n>.safetensors

Saving writes a new cache file, then replaces the manifest atomically, then removes the
old cache file, so a crash at any moment leaves one complete, consistent state. Loading
checks the checksum before reading a byte of tensors, and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emloc import SettingsError, StreamContext

FORMAT = "emloc-stream-state/1"


class StateError(RuntimeError):
    """A saved state cannot be used; the message says why."""


def save_state(folder: str | Path, context: StreamContext, stream: dict) -> Path:
    """Saves `context` and `stream` (plain data: last timestamp, pending questions, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = context.snapshot()
    old = _manifest(folder) if (folder / "manifest.json").exists() else None
    serial = (old or {}).get("serial", 0) + 1
    cache = folder / f"cache-{serial}.safetensors"
    save_file(tensors, str(cache))
    _fsync(cache)
    manifest = dict(format=FORMAT, serial=serial, cache=cache.name, bytes=cache.stat().st_size,
                    sha256=_sha256(cache), context=meta, stream=stream)
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / "manifest.json")
    if old and old.get("cache") and old["cache"] != cache.name:
        (folder / old["cache"]).unlink(missing_ok=True)
    return folder / "manifest.json"


def has_state(folder: str | Path) -> bool:
    return (Path(folder) / "manifest.json").exists()


def load_state(folder: str | Path, context: StreamContext) -> dict:
    """Restores `context` from `folder` and returns the saved stream data; StateError if unusable."""
    folder = Path(folder)
    manifest = _manifest(folder)
    cache = folder / str(manifest.get("cache", ""))
    if not cache.is_file():
        raise StateError(f"{folder}: the cache file {cache.name!r} named by the manifest is missing")
    size = cache.stat().st_size
    if size != manifest.get("bytes") or _sha256(cache) != manifest.get("sha256"):
        raise StateError(f"{cache}: truncated or modified ({size} bytes, checksum does not match the manifest); "
                         f"refusing to resume from it")
    try:
        tensors = load_file(str(cache))
    except SafetensorError as error:
        raise StateError(f"{cache}: not a readable safetensors file: {error}") from error
    try:
        context.restore(tensors, manifest["context"])
    except SettingsError as error:
        raise StateError(f"{folder}: {error}") from error
    except (KeyError, ValueError, TypeError) as error:
        raise StateError(f"{folder}: the saved state is inconsistent: {error}") from error
    return manifest.get("stream", {})


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except OSError as error:
        raise StateError(f"{path}: cannot read the state manifest: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise StateError(f"{path}: the state manifest is not valid JSON ({error}); it was damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{path}: not an emloc-stream state (format {FORMAT!r} expected)")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
