"""Recurrent state of linear-attention layers (Gated DeltaNet in Qwen3.5), carried beside the pruned cache.

A hybrid model interleaves linear-attention layers, which keep a fixed-size state instead of keys and
values, with full-attention layers. The algorithm only sees the full-attention layers: an adapter runs
each one together with the linear-attention layers that feed it (a *block*), and the block's linear
layers keep their state in a `RecurrentStates` attached to that full-attention layer's `PrunedLayer`.
Nothing of it can be pruned (the recurrence has already consumed every token), so it simply follows the
layer's tail:

    committed   the state after every committed chunk, unpruned
    snapshots   {tail mark: state} taken when a run of several tokens starts at that mark; rewinding the
                tail to a mark (`PrunedLayer.drop_tail`) puts that state back, so observers, the search's
                re-runs and answers fork the state and leave it as it was
    commit      the state after the whole chunk becomes the committed one

One-token runs (decoding) take no snapshot: only the marks where a multi-token run started are ever
rewound to, and a rewind to any other mark is refused rather than guessed.

Several observer runs stacked along one sequence (`separate_runs`) are run by the linear layers one
after the other from the same state, since a recurrence cannot be masked: a copy must not see the
copies before it. A stacked pass may begin with `lead` rows (the chunk itself), which do advance it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


@contextmanager
def separate_runs(lead: int, spans: list[tuple[int, int]]) -> Iterator[None]:
    """While active, the rows of every pass are `lead` rows that advance the state, then runs at
    `spans` ((first, end) rows, contiguous after the lead) that each start from the state after the lead
    and are forgotten: what a recurrence needs to run copies that must not see each other."""
    outer = getattr(_local, "segments", None)
    _local.segments = (lead, list(spans))
    try:
        yield
    finally:
        _local.segments = outer


def current_runs() -> tuple[int, list[tuple[int, int]]] | None:
    """(lead, spans) of the stacked pass in progress in this thread, or None (one plain sequence)."""
    return getattr(_local, "segments", None)


class RecurrentStates:
    """The conv and recurrent states of the linear-attention layers of one block, by decoder layer index.

    conv[d]: (1, conv_dim, kernel) the last `kernel` inputs of layer d's causal convolution.
    recurrent[d]: (1, value_heads, key_head_dim, value_head_dim) float32, the delta rule's state.
    A layer absent from `conv` has seen no token yet (it starts from zeros, as the model does).
    """

    def __init__(self) -> None:
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        self.committed: tuple[dict, dict] = ({}, {})
        self.snapshots: dict[int, tuple[dict, dict]] = {}
        self.at = 0  # the tail mark the current state belongs to

    # --- the state's lifecycle, driven by the attention layer's tail -------------------------
    def _state(self) -> tuple[dict, dict]:
        # tensors are replaced, never written in place (get_* hand out copies), so references suffice
        return dict(self.conv), dict(self.recurrent)

    def _put(self, state: tuple[dict, dict]) -> None:
        self.conv, self.recurrent = dict(state[0]), dict(state[1])

    def begin(self, mark: int, n: int) -> None:
        """A run of `n` tokens starts at tail mark `mark` (the attention layer's tail before it)."""
        if n > 1:
            self.snapshots[mark] = self._state()
        self.at = mark

    def end(self, advanced: int) -> None:
        """The run advanced the state by `advanced` tokens (all of them, or only a stacked pass's lead)."""
        self.at += advanced

    def rewind(self, mark: int) -> None:
        """Back to the state at tail mark `mark` (0: the committed state)."""
        if mark == self.at:
            return
        if mark in self.snapshots:
            self._put(self.snapshots[mark])
        elif mark == 0:
            self._put(self.committed)
        else:
            raise RuntimeError(f"the linear-attention state cannot go back to tail mark {mark}: no run of several "
                               f"tokens started there (it is at {self.at}); a recurrence is only forked, never cut")
        self.snapshots = {m: s for m, s in self.snapshots.items() if m <= mark}
        self.at = mark

    def settle(self, mark: int) -> None:
        """The attention layer's tail was replaced by a selection of `mark` tokens: the state (after the
        whole chunk, which pruning cannot undo) now belongs to that mark."""
        self.snapshots = {}
        self.at = mark

    def commit(self) -> None:
        self.committed = self._state()
        self.snapshots = {}
        self.at = 0

    def save(self) -> tuple[dict, dict]:
        return self.committed

    def put_back(self, saved: tuple[dict, dict]) -> None:
        self.committed = saved
        self._put(saved)
        self.snapshots = {}
        self.at = 0

    # --- snapshots ---------------------------------------------------------------------------
    def export(self) -> dict[str, torch.Tensor]:
        """The committed states as standalone tensors: `conv.<d>` and `recurrent.<d>` per decoder layer d."""
        conv, recurrent = self.committed
        out = {f"conv.{d}": t.contiguous().clone() for d, t in conv.items()}
        out.update({f"recurrent.{d}": t.contiguous().clone() for d, t in recurrent.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RecurrentStates:
        """The inverse of `export` (names without the layer prefix); shapes are checked by the caller."""
        states = cls()
        conv, recurrent = {}, {}
        for name, tensor in tensors.items():
            kind, _, index = name.partition(".")
            if kind not in ("conv", "recurrent") or not index.isdigit():
                raise ValueError(f"unknown linear-attention state {name!r}")
            (conv if kind == "conv" else recurrent)[int(index)] = tensor
        states.committed = (conv, recurrent)
        states._put(states.committed)
        return states

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.committed for t in part.values())

    # --- what a linear-attention layer calls (through `BlockCache`) ---------------------------------
    def get_conv_state(self, d: int) -> torch.Tensor | None:
        if d not in self.conv:
            return None
        # one-token decoding updates the conv state in place: hand out a copy, so snapshots stay intact
        self.conv[d] = self.conv[d].clone()
        return self.conv[d]

    def update_conv_state(self, inputs: torch.Tensor, d: int, kernel: int) -> torch.Tensor:
        """inputs: (1, conv_dim, n) new conv inputs; returns them after the stored ones (zeros at the
        start of the stream), as the convolution needs them, and keeps the last `kernel`."""
        previous = self.conv.get(d)
        if previous is None:
            previous = inputs.new_zeros(*inputs.shape[:2], kernel)
        full = torch.cat([previous.to(inputs.dtype), inputs], dim=-1)
        self.conv[d] = full[..., -kernel:].clone()
        return full

    def get_recurrent_state(self, d: int) -> torch.Tensor | None:
        state = self.recurrent.get(d)
        return None if state is None else state.clone()

    def update_recurrent_state(self, state: torch.Tensor, d: int) -> torch.Tensor:
        self.recurrent[d] = state.float()
        return self.recurrent[d]


class BlockCache:
    """The cache a block's decoder layers see: the full-attention layer's keys/values go to its
    `PrunedLayer`, the linear-attention layers' states to its `RecurrentStates`. Decoder layers address
    it by their own index (transformers' hybrid-cache interface, the calls `Qwen3_5GatedDeltaNet` makes)."""

    def __init__(self, layer, attention_index: int) -> None:
        self.layer, self.attention_index, self.states = layer, attention_index, layer.recurrent

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx != self.attention_index:
            raise RuntimeError(f"decoder layer {layer_idx} wrote keys into the block of layer {self.attention_index}")
        return self.layer.update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layer.get_seq_length()

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.states.get_conv_state(layer_idx)

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs):
        return self.states.update_conv_state(conv_states, layer_idx, conv_kernel_size or conv_states.shape[-1])

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.states.get_recurrent_state(layer_idx)

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        if not isinstance(recurrent_states, torch.Tensor):
            raise RuntimeError("intermediate recurrent states were requested; the pruned cache keeps the last only")
        return self.states.update_recurrent_state(recurrent_states, layer_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        pass


def run_linear(call, hidden: torch.Tensor, states: RecurrentStates, d: int) -> torch.Tensor:
    """Runs linear-attention decoder layer d (`call(rows) -> rows`) on `hidden` (1, n, hidden_size): as one
    sequence, or, inside `separate_runs`, the lead rows first and each run from the state after them."""
    runs = current_runs()
    if runs is None:
        return call(hidden)
    lead, spans = runs
    n = hidden.shape[1]
    ends = [lead] + [end for _, end in spans]
    if [first for first, _ in spans] != ends[:-1] or ends[-1] != n:
        raise RuntimeError(f"stacked runs {spans} after {lead} lead rows do not tile the pass's {n} rows")
    pieces = [call(hidden[:, :lead])] if lead else []
    after_lead = (states.conv.get(d), states.recurrent.get(d))
    for first, end in spans:
        pieces.append(call(hidden[:, first:end]))
        for store, value in zip((states.conv, states.recurrent), after_lead):
            store.pop(d, None)
            if value is not None:
                store[d] = value
    return torch.cat(pieces, dim=1)
