"""Integrity of what is loaded from disk: saved states and task packs, one checksum scheme, one set of messages.

Both are tensors in a safetensors file described by a JSON manifest (a state's manifest.json beside
its cache file; a pack's in its own file's header). `seal` writes two checksums into the manifest:

    tensors_sha256  SHA-256 over every tensor, by name in sorted order: "name:dtype:[shape]", then its bytes
    sha256          SHA-256 over the manifest's canonical JSON (sorted keys, no spaces), all but this field

so the manifest's checksum covers the tensors' too: `sha256` is the identity of the whole (a state records
its task pack's). Checking the two apart names what changed: the manifest (an edited field) or the
tensors (a damaged or truncated file). The tensors are hashed rather than the file's bytes so that the
scheme does not depend on how safetensors lays a file out, and holds for a manifest inside the file.

A checksum finds damage and edits, not a forger who recomputes it; what the loaders check after it
(counters against layers, shapes, sinks) is what stands against a forger.

Files written by the previous schemes are still read, checked the way they were written, here and only
here: states of format emloc-stream-state/3 (`manifest_sha256` over the manifest, `bytes` and `sha256`
of the cache file) and packs of format emloc-task-pack/1 (one `sha256` over the manifest and tensors).
A state saved again is written in the current scheme; a pack keeps its checksum, the identity that
states folded from it recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

CHECKSUM = "sha256"  # the manifest's checksum (over everything else in it)
TENSORS_CHECKSUM = "tensors_sha256"
LEGACY_STATE = "emloc-stream-state/3"
LEGACY_PACK = "emloc-task-pack/1"


@dataclass(frozen=True)
class Stored:
    """A kind of file loaded from disk, for the messages: what it is, how it was made, the error a
    refusal raises and what a user does about it."""

    what: str  # "state", "task pack"
    made: str  # "saved", "built"
    error: type[Exception]
    remedy: str


def seal(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """`manifest` with its checksums, in the current scheme (the module's docstring): what is written."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    body[TENSORS_CHECKSUM] = tensors_sha256(tensors)
    body[CHECKSUM] = json_sha256(body, CHECKSUM)
    return body


def read_tensors(path: Path, stored: Stored) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors file, or the refusal naming it (nothing is unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise stored.error(f"{path}: not a readable {stored.what}: not a safetensors file, or truncated ({reason}); "
                           f"{stored.remedy}") from error


def check_manifest(path: Path, manifest: dict, stored: Stored) -> None:
    """Refuses a manifest edited after it was written (a pack of the previous scheme is checked whole by
    `check_tensors`: its one checksum covers both)."""
    if manifest.get("format") == LEGACY_STATE:
        intact = manifest.get("manifest_sha256") == json_sha256(manifest, "manifest_sha256")
    elif manifest.get("format") == LEGACY_PACK:
        intact = True
    else:
        intact = manifest.get(CHECKSUM) == json_sha256(manifest, CHECKSUM)
    if not intact:
        raise stored.error(f"{path}: the {stored.what}'s manifest was modified after it was {stored.made} (its "
                           f"checksum does not match); {stored.remedy}")


def check_tensors(path: Path, manifest: dict, tensors: dict[str, torch.Tensor], stored: Stored) -> None:
    """Refuses tensors (read from `path`) that are not those the manifest was sealed with."""
    if manifest.get("format") == LEGACY_STATE:  # the cache file's size and bytes
        intact = path.stat().st_size == manifest.get("bytes") and _file_sha256(path) == manifest.get("sha256")
    elif manifest.get("format") == LEGACY_PACK:  # the manifest and the tensors in one checksum
        digest = hashlib.sha256(_canonical(manifest, CHECKSUM))
        _update_with_tensors(digest, tensors)
        intact = manifest.get(CHECKSUM) == digest.hexdigest()
    else:
        intact = manifest.get(TENSORS_CHECKSUM) == tensors_sha256(tensors)
    if not intact:
        raise stored.error(f"{path}: truncated or modified after it was {stored.made} (its tensors do not match "
                           f"the checksum in its manifest); {stored.remedy}")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    _update_with_tensors(digest, tensors)
    return digest.hexdigest()


def json_sha256(manifest: dict, without: str) -> str:
    """SHA-256 of the manifest's canonical JSON, leaving out the field `without` (the checksum's own)."""
    return hashlib.sha256(_canonical(manifest, without)).hexdigest()


def _canonical(manifest: dict, without: str) -> bytes:
    body = {k: v for k, v in manifest.items() if k != without}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _update_with_tensors(digest, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
