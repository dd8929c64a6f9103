"""emloc/integrity.py: one checksum scheme and one set of messages for everything loaded from disk.

The loaders' own tests (test_state.py, test_task_pack.py) tamper with real states and packs; these
check the scheme itself on a small safetensors file: what it covers, and that a state and a pack
refuse the same damage in the same words.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from emloc.integrity import CHECKSUM, TENSORS_CHECKSUM, Stored, check_manifest, check_tensors, read_tensors, seal

STATE = Stored("state", "saved", RuntimeError, "start again")
PACK = Stored("task pack", "built", ValueError, "build it again")
TENSORS = {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
           "empty": torch.zeros(0), "scalar": torch.tensor(3.5)}


def written(tmp_path, tensors=TENSORS):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path


def test_the_checksum_covers_every_field_and_every_tensor_and_the_manifests_covers_the_tensors(tmp_path):
    manifest = seal({"format": "x/1", "counters": {"n": 3}}, TENSORS)
    assert set(manifest) == {"format", "counters", TENSORS_CHECKSUM, CHECKSUM}
    path = written(tmp_path)
    tensors, _ = read_tensors(path, STATE)
    check_manifest(path, json.loads(json.dumps(manifest)), STATE)  # through JSON, as read from disk
    check_tensors(path, manifest, tensors, STATE)
    assert seal(dict(manifest, counters={"n": 4}), TENSORS)[CHECKSUM] != manifest[CHECKSUM]
    for name, changed in [("a", TENSORS["a"] + 1), ("b", TENSORS["b"].to(torch.float16)),
                          ("a", TENSORS["a"].reshape(3, 2)), ("empty", torch.zeros(1)), ("renamed", TENSORS["a"])]:
        other = seal(manifest, dict({k: v for k, v in TENSORS.items() if name != "renamed" or k != "a"},
                                    **{name: changed}))
        assert other[TENSORS_CHECKSUM] != manifest[TENSORS_CHECKSUM] and other[CHECKSUM] != manifest[CHECKSUM]

@pytest.mark.parametrize("stored", [STATE, PACK], ids=["state", "pack"])
def test_a_state_and_a_pack_refuse_the_same_damage_in_the_same_words(tmp_path, stored):
    manifest = seal({"format": "x/1", "counters": {"n": 3}}, TENSORS)
    path = written(tmp_path)
    with pytest.raises(stored.error) as edited:
        check_manifest(path, dict(manifest, counters={"n": 4}), stored)
    assert str(edited.value) == (f"{path}: the {stored.what}'s manifest was modified after it was {stored.made} "
                                 f"(its checksum does not match); {stored.remedy}")
    damaged = {k: v.clone() for k, v in TENSORS.items()}
    damaged["a"][0, 0] = 99
    with pytest.raises(stored.error) as modified:
        check_tensors(path, manifest, damaged, stored)
    assert str(modified.value) == (f"{path}: truncated or modified after it was {stored.made} (its tensors do not "
                                   f"match the checksum in its manifest); {stored.remedy}")
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(stored.error) as truncated:
        read_tensors(path, stored)
    assert str(truncated.value).startswith(f"{path}: not a readable {stored.what}: not a safetensors file, or "
                                           f"truncated (")
    assert str(truncated.value).endswith(f"); {stored.remedy}")
