"""The compressed KV cache: one layer type of transformers' cache family.

Each layer holds, per KV head, the keys (already rotated by RoPE) and values of
the tokens it kept, in a growable buffer:

    [ committed: kept tokens of earlier chunks | tail: tokens being folded or asked ]
      0 .................................... length ........................ length + tail

`update` (what the library's attention module calls) writes new tokens after the
tail and returns a view of everything, so attention runs on the cache unchanged.
The tail is tentative: a fold replaces it by the retained selection and commits
it; a question drops it, which leaves the committed region bit-identical.

Layers may hold different lengths; within a layer every KV head holds the same
number of tokens (pruning keeps the same count per head, not the same tokens), so
each layer stays one rectangular tensor. Pruning never renumbers positions: keys
keep the rotation of their original position, and `origins` records each kept
token's index in the stream. (A stream past its model's temporal range moves its
video's keys to compressed positions with `replace_keys`; `StreamContext`.)

With merging on (`EMLoCSettings.merge_dropped`), a kept token also stands for the
dropped tokens most like it: `log_mass` (log of how many it stands for) is added to
its attention logit, so the attention a run of redundant tokens drew is kept
(proportional attention). A layer that never merged has none and no attention bias.

A hybrid model's full-attention layer also carries the state of the linear-attention layers that
feed it (`recurrent`, `emloc.recurrent.RecurrentStates`): it follows the tail (forked by a rewind,
committed with it) and is never pruned.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PrunedLayer(CacheLayerMixin):
    """Keys/values of one decoder layer with a per-layer length.

    Buffers have shape (1, kv_heads, capacity, head_dim); `origins` (stream token
    index) and `importance` (accumulated observer attention) are (1, kv_heads,
    capacity) and describe the committed tokens.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:  # the mixin's __init__ would bind `keys` to None
        self.is_initialized = False
        self.length = 0
        self.tail = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.origins: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None
        self.log_mass: torch.Tensor | None = None
        self.merged = False  # some token stands for more than itself: attention needs the bias
        self.recurrent = None  # linear-attention states of a hybrid model's block (emloc.recurrent)

    # --- the transformers cache-layer interface -------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise ValueError(f"a stream's cache holds one sequence; got a batch of {key_states.shape[0]}")
        b, h, _, d = key_states.shape
        cap = 256
        self.device = key_states.device
        self._k = key_states.new_zeros(b, h, cap, d)
        self._v = value_states.new_zeros(b, h, cap, value_states.shape[-1])
        self.origins = torch.zeros(b, h, cap, dtype=torch.long, device=self.device)
        self.importance = torch.zeros(b, h, cap, dtype=torch.float32, device=self.device)
        self.log_mass = torch.zeros(b, h, cap, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + self.tail
        n = key_states.shape[-2]
        self._reserve(end + n)
        self._k[:, :, end:end + n] = key_states
        self._v[:, :, end:end + n] = value_states
        self.log_mass[:, :, end:end + n] = 0
        self.tail += n
        return self._k[:, :, :end + n], self._v[:, :, :end + n]

    def get_seq_length(self) -> int:
        return self.length + self.tail

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + self.tail + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # --- views ---------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def all_keys(self) -> torch.Tensor:
        """Committed and tail keys, as the last attention call saw them."""
        return self._k[:, :, :self.length + self.tail]

    def tail_keys(self) -> torch.Tensor:
        return self._k[:, :, self.length:self.length + self.tail]

    def tail_values(self) -> torch.Tensor:
        return self._v[:, :, self.length:self.length + self.tail]

    def committed_origins(self) -> torch.Tensor:
        return self.origins[:, :, :self.length]

    def committed_importance(self) -> torch.Tensor:
        return self.importance[:, :, :self.length]

    def attention_bias(self) -> torch.Tensor | None:
        """(1, kv_heads, length + tail) log-mass to add to the attention logits of the cached
        keys, or None when no token stands for more than itself."""
        return self.log_mass[:, :, :self.length + self.tail] if self.merged else None

    # --- tail edits --------------------------------------------------------------------
    def set_tail(self, keys: torch.Tensor, values: torch.Tensor, log_mass: torch.Tensor | None = None) -> None:
        """Replaces the tail by `keys`/`values` (a retained selection of a chunk); log_mass:
        (1, kv_heads, n) what each stands for, when dropped tokens were merged into it."""
        n = keys.shape[-2]
        self._reserve(self.length + n)
        self._k[:, :, self.length:self.length + n] = keys
        self._v[:, :, self.length:self.length + n] = values
        self.log_mass[:, :, self.length:self.length + n] = 0 if log_mass is None else log_mass
        self.merged = self.merged or log_mass is not None
        self.tail = n
        if self.recurrent is not None:
            self.recurrent.settle(n)

    def drop_tail(self, keep: int = 0) -> None:
        """Forgets tail tokens after the first `keep` (observer or question tokens)."""
        if not 0 <= keep <= self.tail:
            raise ValueError(f"cannot keep {keep} of {self.tail} tail tokens")
        if self.recurrent is not None:
            self.recurrent.rewind(keep)
        self.tail = keep

    def commit_tail(self, origins: torch.Tensor, importance: torch.Tensor) -> None:
        """Makes the tail part of the committed context. origins/importance: (1, kv_heads, tail)."""
        if origins.shape[-1] != self.tail or importance.shape[-1] != self.tail:
            raise ValueError(f"commit needs metadata for {self.tail} tail tokens, got {origins.shape[-1]}")
        end = self.length + self.tail
        self.origins[:, :, self.length:end] = origins
        self.importance[:, :, self.length:end] = importance.float()
        self.length, self.tail = end, 0
        if self.recurrent is not None:
            self.recurrent.commit()

    def keep_committed(self, index: torch.Tensor) -> None:
        """Keeps only the committed tokens at `index` (1, kv_heads, n), ascending per head.
        Writes fresh buffers, so a rollback (`PrunedCache.saved`) can put the old ones back."""
        if self.tail:
            raise RuntimeError("evict only between folds, with no tail pending")
        n = index.shape[-1]
        kidx = index.unsqueeze(-1).expand(-1, -1, -1, self._k.shape[-1])

        def kept(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            new = torch.empty_like(buf)
            new[:, :, :n] = torch.gather(buf[:, :, :self.length], 2, idx)
            return new

        self._k, self._v = kept(self._k, kidx), kept(self._v, kidx)
        self.origins, self.importance = kept(self.origins, index), kept(self.importance, index)
        self.log_mass = kept(self.log_mass, index)
        self.length = n

    def replace_keys(self, keys: torch.Tensor) -> None:
        """Replaces the committed keys by `keys` (same shape), e.g. re-rotated to new positions.
        Writes a fresh buffer, so a rollback (`PrunedCache.saved`) puts the old keys back."""
        if self.tail:
            raise RuntimeError("replace keys only between folds, with no tail pending")
        if tuple(keys.shape) != tuple(self.keys.shape):
            raise ValueError(f"new keys {tuple(keys.shape)} for committed keys {tuple(self.keys.shape)}")
        new = self._k.clone()
        new[:, :, :self.length] = keys
        self._k = new

    # --- rollback -------------------------------------------------------------------
    def save(self) -> tuple:
        """What `put_back` needs to undo later commits and evictions: the committed length, the
        buffers (commits only write past the length; evictions and growth write new buffers) and
        a copy of the committed importance (a commit decays it in place). Needs no tail pending."""
        if self.tail:
            raise RuntimeError("save the layer with no tail pending")
        if not self.is_initialized:
            return (None,)
        return (self.length, self._k, self._v, self.origins, self.importance, self.log_mass, self.merged,
                self.committed_importance().clone(), self.recurrent, self.recurrent and self.recurrent.save())

    def put_back(self, saved: tuple) -> None:
        """Returns the layer to the state `save` recorded, with no tail."""
        if saved[0] is None:
            self.__init__()
            return
        (self.length, self._k, self._v, self.origins, self.importance, self.log_mass, self.merged, importance,
         self.recurrent, states) = saved
        self.importance[:, :, :self.length] = importance
        self.tail = 0
        if self.recurrent is not None:
            self.recurrent.put_back(states)

    # --- snapshots --------------------------------------------------------------------
    def export(self) -> dict[str, torch.Tensor]:
        """The committed state as standalone tensors (for saving); empty if never written."""
        if not self.is_initialized:
            return {}
        out = {name: view.contiguous().clone() for name, view in (
            ("keys", self.keys), ("values", self.values), ("origins", self.committed_origins()),
            ("importance", self.committed_importance()))}
        if self.merged:
            out["log_mass"] = self.log_mass[:, :, :self.length].contiguous().clone()
        if self.recurrent is not None:
            out.update(self.recurrent.export())
        return out

    def restore(self, keys: torch.Tensor, values: torch.Tensor, origins: torch.Tensor,
                importance: torch.Tensor, log_mass: torch.Tensor | None = None,
                recurrent: dict[str, torch.Tensor] | None = None) -> None:
        """Replaces the layer by exported state (no tail); recurrent: its linear-attention states
        (`conv.<d>`, `recurrent.<d>`), for a hybrid model's layer."""
        n = keys.shape[2]
        shapes = (values.shape[2], origins.shape[-1], importance.shape[-1]) + (
            () if log_mass is None else (log_mass.shape[-1],))
        if any(m != n for m in shapes) or keys.dim() != 4 or keys.shape[0] != 1:
            raise ValueError(f"inconsistent layer state: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                             f"origins {tuple(origins.shape)}, importance {tuple(importance.shape)}")
        self.lazy_initialization(keys[:, :, :0], values[:, :, :0])
        self._reserve(n)
        self._k[:, :, :n], self._v[:, :, :n] = keys, values
        self.origins[:, :, :n], self.importance[:, :, :n] = origins, importance.float()
        self.merged = log_mass is not None
        self.log_mass[:, :, :n] = 0 if log_mass is None else log_mass.float()
        self.length, self.tail = n, 0
        if recurrent:
            from .recurrent import RecurrentStates

            self.recurrent = RecurrentStates.from_tensors(recurrent)
        else:
            self.recurrent = None

    def nbytes(self) -> int:
        """Bytes of the committed keys, values and their metadata."""
        if not self.is_initialized:
            return 0
        per_token = (self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size()
                     + self.origins.element_size() + self.importance.element_size()
                     + (self.log_mass.element_size() if self.merged else 0))
        return self.length * self._k.shape[1] * per_token + (self.recurrent.nbytes() if self.recurrent else 0)

    def capacity_nbytes(self) -> int:
        """Bytes allocated, committed or not."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self.origins, self.importance,
                                                           self.log_mass))

    def _reserve(self, size: int) -> None:
        cap = self._k.shape[2]
        if size <= cap:
            return
        while cap < size:
            cap *= 2
        used = self.length + self.tail

        def grow(buf: torch.Tensor) -> torch.Tensor:
            new = buf.new_zeros(*buf.shape[:2], cap, *buf.shape[3:])
            new[:, :, :used] = buf[:, :, :used]
            return new

        self._k, self._v = grow(self._k), grow(self._v)
        self.origins, self.importance, self.log_mass = grow(self.origins), grow(self.importance), grow(self.log_mass)


class PrunedCache(Cache):
    """One `PrunedLayer` per decoder layer; the library's attention modules call `update`."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[PrunedLayer() for _ in range(num_layers)])

    def lengths(self) -> list[int]:
        """Committed tokens per layer."""
        return [layer.length for layer in self.layers]

    def drop_tails(self) -> None:
        for layer in self.layers:
            layer.drop_tail(0)

    @contextmanager
    def saved(self):
        """All or nothing: if the block raises, every layer is put back as it was when the block
        began (committed tokens, their metadata, no tail), whatever it had committed or evicted."""
        saved = [layer.save() for layer in self.layers]
        try:
            yield
        except BaseException:
            for layer, state in zip(self.layers, saved):
                layer.put_back(state)
            raise

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def export(self) -> dict[str, torch.Tensor]:
        """Every layer's committed state, named `layers.<i>.<keys|values|origins|importance>` (and
        `log_mass` for a layer that merged, `conv.<d>`/`recurrent.<d>` for a hybrid model's block)."""
        return {f"layers.{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.export().items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            try:
                parts = [tensors[f"layers.{i}.{name}"] for name in ("keys", "values", "origins", "importance")]
            except KeyError as error:
                raise ValueError(f"saved cache has no {error.args[0]!r}") from error
            linear = {name[len(f"layers.{i}."):]: t for name, t in tensors.items()
                      if name.startswith((f"layers.{i}.conv.", f"layers.{i}.recurrent."))}
            layer.restore(*parts, tensors.get(f"layers.{i}.log_mass"), linear)

    def capacity_nbytes(self) -> int:
        return sum(layer.capacity_nbytes() for layer in self.layers)
