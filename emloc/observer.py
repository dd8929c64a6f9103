"""Observers: the tokens whose output distribution pruning must preserve.

A pass of an observer after the tentative cache records, per layer, the hidden
state entering it (to restart the search there) and the observer's attention
onto every cached key. The attention comes from our own q.k on the layer's
attention input (a forward hook), so the model keeps running `sdpa`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import ModelAdapter
from .cache import PrunedCache
from .copies import ChunkView, Copies, copy_attention
from .forward import run_layers
from .recurrent import separate_runs


@dataclass(frozen=True)
class Observer:
    """kind: 'question' (waiting), 'standing' (re-asked), or 'probe' (generic prompt).

    answer_ids: the model's own answer appended to the prompt (probe answers, when enabled).
    """

    kind: str
    text: str
    answer_ids: tuple[int, ...] = ()


@dataclass
class ObserverPass:
    """One observer run over the unpruned chunk: what the search needs to restart it.

    layer_inputs[l]: (1, n, d) hidden state entering layer l.
    rotary: (cos, sin) of the observer positions.
    reference: (m, vocab) float32 log-probabilities at the last m positions.
    attention[l]: (1, kv_heads, keys) observer attention onto the keys cached before it,
        summed over observer positions and over the query heads sharing a KV head.
    """

    observer: Observer
    layer_inputs: list[torch.Tensor]
    rotary: tuple[torch.Tensor, torch.Tensor]
    positions: torch.Tensor
    reference: torch.Tensor
    attention: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def attention_capture(adapter: ModelAdapter, cache: PrunedCache, copies: Copies):
    """Records, while active, each layer's attention of every copy's rows onto the keys cached
    before the copies (and the lead rows). Yields a dict layer -> [(1, kv_heads, keys)] per copy."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    lead = copies.lead

    start = [layer.get_seq_length() for layer in cache.layers]  # keys before the pass

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            # the rows of this call: the whole pass, or its last block (`forward.QUERY_BLOCK`)
            layer = cache.layers[index]
            block = kwargs["hidden_states"].shape[1]
            first = layer.get_seq_length() - start[index] - block  # the block's first row in the pass
            if first + block <= lead:
                return  # a block of the lead's rows only
            skip = lead - first
            hidden = kwargs["hidden_states"][:, skip:]
            cos, sin = kwargs["position_embeddings"]
            queries = adapter.queries(index, hidden, (cos[..., skip:, :], sin[..., skip:, :]))
            keys = layer.all_keys()
            captured[index] = copy_attention(queries, keys, adapter.attention_scale(index), copies,
                                             keys.shape[2] - hidden.shape[1], layer.attention_bias())
        return hook

    for index in range(adapter.num_layers):
        module = adapter.attention_module(index)
        handles.append(module.register_forward_hook(hook_for(index), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def observe(adapter: ModelAdapter, cache: PrunedCache, observer: Observer, token_ids: torch.Tensor | None,
            positions: torch.Tensor, observed: int, embeds: torch.Tensor | None = None) -> ObserverPass:
    """Runs `observer` after everything in the cache (committed + tail) and drops its tokens again.
    embeds: the observer's input embeddings (1, n, d) instead of `token_ids` (an example observer
    holds a picture as well as text)."""
    hidden = embeds if embeds is not None else adapter.embed_text(token_ids)
    return observe_together(adapter, cache, [ObserverRun(observer, hidden, positions, observed)])[0][0]


@dataclass(frozen=True)
class ObserverRun:
    """An observer ready to run: its embeddings (1, n, d), positions (3, n), and how many of its last
    positions the bound protects."""

    observer: Observer
    embeds: torch.Tensor
    positions: torch.Tensor
    observed: int


def observe_together(adapter: ModelAdapter, cache: PrunedCache, runs: list[ObserverRun],
                     lead: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[list[ObserverPass], list[torch.Tensor]]:
    """Runs every observer of `runs` after the cache in one pass, as copies that do not see each
    other, and drops their tokens again.

    lead: (embeddings, positions) of a chunk to prefill in the same pass, before the one observer
        (it stays in the tails, as a plain prefill would leave it): the chunk and its observer
        cost one pass instead of two.
    Returns the passes and, per observer, the float32 log-probabilities of its next token at every
    position (n, vocab).
    """
    if lead is not None and len(runs) != 1:
        raise ValueError("a chunk is prefilled together with exactly one observer")
    pieces = ([lead[0]] if lead is not None else []) + [run.embeds for run in runs]
    where = ([lead[1]] if lead is not None else []) + [run.positions for run in runs]
    hidden, positions = torch.cat(pieces, dim=1), torch.cat(where, dim=1)
    copies = Copies([run.embeds.shape[1] for run in runs], lead=lead[0].shape[1] if lead is not None else 0)
    rotary = adapter.rotary(hidden, positions)
    inputs: list = [None] * adapter.num_layers
    tails = [layer.tail for layer in cache.layers]
    keep = copies.lead  # tail tokens that stay: the chunk prefilled in this pass
    mask_for = None
    if len(runs) > 1:
        def mask_for(index, states):
            return copies.mask(adapter, cache, index, states)
    try:
        # separate_runs: a hybrid model's linear-attention layers run each copy from the state after the lead
        with attention_capture(adapter, cache, copies) as captured, separate_runs(copies.lead, copies.spans):
            out = run_layers(adapter, cache, hidden, positions, record_inputs=inputs, rotary=rotary,
                             record_from=copies.lead, mask_for=mask_for)
    finally:
        for layer, tail in zip(cache.layers, tails):
            layer.drop_tail(tail + keep)
    passes, every_row = [], []
    cos, sin = rotary
    for c, (run, (first, end)) in enumerate(zip(runs, copies.spans)):
        log_probs = F.log_softmax(adapter.logits(out[:, first:end])[0], dim=-1)
        m = min(run.observed, end - first)
        a, b = first - copies.lead, end - copies.lead
        passes.append(ObserverPass(
            run.observer, [None if x is None else x[:, a:b] for x in inputs],
            (cos[..., first:end, :], sin[..., first:end, :]),
            positions[:, first:end], log_probs[-m:], [captured[i][c] for i in range(adapter.num_layers)]))
        every_row.append(log_probs)
    return passes, every_row


def rerun_together(adapter: ModelAdapter, cache: PrunedCache, runs: list[ObserverPass], start_layer: int,
                   views: dict[int, list[ChunkView]] | None = None) -> list[torch.Tensor]:
    """Re-runs observer passes from `start_layer` (their recorded inputs there) against the cache as it
    stands, all in one pass as copies; `views[layer][c]` narrows what copy c sees of that layer's tail
    (a candidate selection of the chunk). Returns float32 log-probabilities at each run's observed
    positions."""
    copies = Copies([run.layer_inputs[start_layer].shape[1] for run in runs], views=views or {})
    hidden = torch.cat([run.layer_inputs[start_layer] for run in runs], dim=1)
    positions = torch.cat([run.positions for run in runs], dim=1)
    rotary = tuple(torch.cat([run.rotary[k] for run in runs], dim=-2) for k in (0, 1))
    tails = [layer.tail for layer in cache.layers]
    try:
        with separate_runs(0, copies.spans):
            out = run_layers(adapter, cache, hidden, positions, start_layer=start_layer, rotary=rotary,
                             mask_for=lambda index, states: copies.mask(adapter, cache, index, states))
    finally:
        for layer, tail in zip(cache.layers, tails):
            layer.drop_tail(tail)
    results = []
    for run, (_, end) in zip(runs, copies.spans):
        m = run.reference.shape[0]
        results.append(F.log_softmax(adapter.logits(out[:, end - m:end])[0], dim=-1))
    return results


def rerun_log_probs(adapter: ModelAdapter, cache: PrunedCache, run: ObserverPass, start_layer: int) -> torch.Tensor:
    """Re-runs an observer from `start_layer` (its recorded input there) against the cache
    as it stands; returns float32 log-probabilities at the observed positions. One pass per
    observer and candidate: what flash attention, which takes no copies' mask, is left with."""
    tails = [layer.tail for layer in cache.layers]
    try:
        out = run_layers(adapter, cache, run.layer_inputs[start_layer], run.positions,
                         start_layer=start_layer, rotary=run.rotary)
    finally:
        for layer, tail in zip(cache.layers, tails):
            layer.drop_tail(tail)
    return F.log_softmax(adapter.logits(out[:, -run.reference.shape[0]:])[0], dim=-1)


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) between rows of log-probabilities, averaged over rows.
    Computed in float32 whatever the inputs' dtype."""
    log_p, log_q = log_p.float(), log_q.float()
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return float((0.5 * (kl_pm + kl_qm)).mean().clamp_min(0.0))

