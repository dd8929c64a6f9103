"""The model path over a compressed cache: run decoder layers, build masks, take logits.

Layers hold different prefix lengths, so each layer gets its own mask: new tokens
see that layer's whole cached prefix and each other causally.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .adapters import ModelAdapter
from .adapters.base import check_attention
from .cache import PrunedCache


def prefix_mask(attention: str, prefix_len: int, n: int, device: torch.device,
                dtype: torch.dtype = torch.float32):
    """The mask `attention` (a transformers attention implementation) needs for `n` new queries
    after `prefix_len` cached keys: each query sees the whole prefix and the new tokens up to
    itself. Built by the library's own mask function for that implementation, so each gets the
    form it honours: (1, 1, n, prefix_len + n) booleans for sdpa, an additive float mask (0 or
    the dtype's minimum) for eager, a BlockMask for flex attention, None for flash attention
    (which aligns causal masks bottom-right, leaving the prefix fully visible)."""
    build = ALL_MASK_ATTENTION_FUNCTIONS[check_attention(attention)]
    return build(batch_size=1, q_length=n, kv_length=prefix_len + n, q_offset=prefix_len, kv_offset=0,
                 device=device, dtype=dtype, allow_is_causal_skip=False)


def layer_mask(adapter: ModelAdapter, cache: PrunedCache, index: int, hidden: torch.Tensor):
    """The implementation's own causal mask over [cached | new]; where the layer holds merged tokens,
    an additive float mask (1, heads, n, cached + n) that also adds each cached key's log-mass
    (sdpa and eager take it; flash attention cannot, and merging refuses it at the start)."""
    n = hidden.shape[1]
    layer = cache.layers[index]
    bias = layer.attention_bias() if layer.is_initialized else None
    if bias is None:
        if n == 1:
            return None  # one query sees everything cached
        return prefix_mask(adapter.attention_implementation, layer.get_seq_length(), n, hidden.device, hidden.dtype)
    cached = layer.get_seq_length()
    keys = torch.arange(cached + n, device=hidden.device)
    allowed = keys.unsqueeze(0) <= torch.arange(n, device=hidden.device).unsqueeze(1) + cached  # (n, cached + n)
    additive = torch.zeros(1, bias.shape[1], 1, cached + n, device=hidden.device, dtype=hidden.dtype)
    additive[..., :cached] = bias.unsqueeze(2)
    additive = additive.repeat_interleave(adapter.num_heads // bias.shape[1], dim=1)
    # the one full-size tensor, built in the model's dtype: a chunk's prefill over merged tokens holds
    # (heads, chunk, cached + chunk) of it, which in float32 plus a cast was twice the mask on the peak
    return additive.masked_fill(~allowed, float("-inf"))


@dataclass
class LayerWork:
    """Decoder work, counted the way a GPU pays for it: `calls` sequential decoder-layer calls
    (each a round of kernel launches, however few its tokens) and `token_layers` tokens x layers
    (the arithmetic). Hardware-independent, so CPU runs can state what a GPU fold would cost."""

    calls: int = 0
    token_layers: int = 0

    def __sub__(self, other: LayerWork) -> LayerWork:
        return LayerWork(self.calls - other.calls, self.token_layers - other.token_layers)


_counters = threading.local()

# Rows of a prefill run through a layer at a time where that layer holds merged tokens: its additive mask
# carries a log-mass per KV head, so it is (heads, rows, cached + rows) in the model's dtype; for a 7B
# chunk of 4,608 tokens that was 1.6 GB in one piece, more than the whole cache full context keeps.
# Only the lead rows are cut: an observer run after the chunk stays whole in the last block.
QUERY_BLOCK = 1024


@contextmanager
def counting_layers() -> Iterator[LayerWork]:
    """Counts, in this thread, the decoder-layer calls `run_layers` makes while the block runs."""
    outer = getattr(_counters, "work", None)
    work = _counters.work = LayerWork()
    try:
        yield work
    finally:
        _counters.work = outer
        if outer is not None:
            outer.calls += work.calls
            outer.token_layers += work.token_layers


def run_layers(adapter: ModelAdapter, cache: PrunedCache, hidden: torch.Tensor, positions: torch.Tensor,
               start_layer: int = 0, record_inputs: list | None = None,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None, record_from: int = 0,
               mask_for: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Runs layers `start_layer..L-1` on `hidden` (1, n, d), appending its keys/values
    to every layer's tail; returns the last layer's output (before the final norm).

    record_inputs: if given, a list of length L that receives the input of each layer run
        (its rows from `record_from` on: an observer run after a chunk in the same pass).
    rotary: precomputed (cos, sin) for `positions`, to skip recomputing them.
    mask_for: (layer index, hidden) -> that layer's mask, instead of the causal one
        (observer copies that must not see each other: `emloc.copies`).
    """
    rotary = rotary if rotary is not None else adapter.rotary(hidden, positions)
    work = getattr(_counters, "work", None)
    for index in range(start_layer, adapter.num_layers):
        if record_inputs is not None:
            record_inputs[index] = hidden[:, record_from:] if record_from else hidden
        if mask_for is not None:
            hidden = adapter.run_layer(index, hidden, mask_for(index, hidden), rotary, cache)
        else:
            hidden = _run_layer_in_blocks(adapter, cache, index, hidden, rotary, record_from or hidden.shape[1])
        if work is not None:
            work.calls += 1
            work.token_layers += hidden.shape[1]
    return hidden


def _run_layer_in_blocks(adapter: ModelAdapter, cache: PrunedCache, index: int, hidden: torch.Tensor,
                         rotary: tuple[torch.Tensor, torch.Tensor], lead: int) -> torch.Tensor:
    """One layer over `hidden` (1, n, d), its first `lead` rows cut in blocks of QUERY_BLOCK when the layer
    holds merged tokens (a block sees the ones before it in the tail, so the result is the causal pass's;
    the rows after `lead` go whole with the last block). Counted as one call: each block is a full-width
    pass, not a launch-bound sliver. Not for a hybrid model, whose recurrent state is recorded per run."""
    n, layer = hidden.shape[1], cache.layers[index]
    cuts = list(range(QUERY_BLOCK, lead, QUERY_BLOCK))
    if not cuts or not layer.is_initialized or layer.attention_bias() is None or adapter.recurrent_state_shapes(index):
        return adapter.run_layer(index, hidden, layer_mask(adapter, cache, index, hidden), rotary, cache)
    cos, sin = rotary
    bounds = [0, *cuts]
    outs = []
    for start, end in zip(bounds, bounds[1:] + [n]):
        part = hidden[:, start:end]
        outs.append(adapter.run_layer(index, part, layer_mask(adapter, cache, index, part),
                                      (cos[..., start:end, :], sin[..., start:end, :]), cache))
    return torch.cat(outs, dim=1)


@torch.no_grad()
def generate(adapter: ModelAdapter, cache: PrunedCache, prompt: torch.Tensor, prompt_positions: torch.Tensor,
             max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, prompt_embeds: torch.Tensor | None = None,
             timing: dict | None = None):
    """Prefills `prompt` (token ids, or `prompt_embeds`) then decodes up to `max_new_tokens`.

    Greedy when temperature == 0. Appends to the cache's tails; the caller drops them.
    Returns (new token ids, float32 logits of the prompt positions).
    timing: if given, receives `first_token_s` (the prompt's pass up to the first token's logits: bound
        by the prompt and cache length) and `decode_s` (every later token: one sequential pass each,
        bound by launch latency and reading the cache).
    """
    clock = time.perf_counter()
    hidden = prompt_embeds if prompt_embeds is not None else adapter.embed_text(prompt)
    out = run_layers(adapter, cache, hidden, prompt_positions)
    prompt_logits = adapter.logits(out)[0]
    next_logits = prompt_logits[-1]
    if timing is not None:
        _sync(prompt_logits.device)
    first_token = time.perf_counter()
    position = int(prompt_positions.max()) + 1
    stop = adapter.stop_ids()
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = _pick(next_logits, temperature, top_p, generator)
        if token in stop:
            break
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        ids = torch.tensor([token])
        out = run_layers(adapter, cache, adapter.embed_text(ids), adapter.text_positions(position, 1))
        next_logits = adapter.logits(out)[0, -1]
        position += 1
    if timing is not None:
        _sync(prompt_logits.device)
        timing["first_token_s"] = first_token - clock
        timing["decode_s"] = time.perf_counter() - first_token
    return tokens, prompt_logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_p, dim=-1) - sorted_p > top_p
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
