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
from .forward import run_layers


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
def attention_capture(adapter: ModelAdapter, cache: PrunedCache, n_queries: int):
    """Records, while active, each layer's attention of its last `n_queries` inputs onto
    the keys cached before them. Yields a dict layer -> (1, kv_heads, keys)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"]
            queries = adapter.queries(index, hidden, kwargs["position_embeddings"])
            layer = cache.layers[index]
            captured[index] = observer_attention(queries, layer.all_keys(), adapter.attention_scale(index), n_queries,
                                                 layer.attention_bias())
        return hook

    for index in range(adapter.num_layers):
        module = adapter.attention_module(index)
        handles.append(module.register_forward_hook(hook_for(index), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def observer_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, n: int,
                       key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of `queries` (1, H, n, D) onto `keys` (1, Hkv, P + n, D), the last n
    keys being the queries' own (causal). Returns (1, Hkv, P): attention onto the first P keys,
    summed over the n queries and the query heads of each KV head, in float32.
    key_bias: (1, Hkv, >= P + n) log-mass of merged keys, added to their logits."""
    heads, kv_heads = queries.shape[1], keys.shape[1]
    q = queries.float().reshape(1, kv_heads, heads // kv_heads * n, -1)
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # (1, Hkv, G*n, P+n)
    if key_bias is not None:
        scores = scores + key_bias[..., :keys.shape[2]].unsqueeze(2)
    prefix = keys.shape[2] - n
    own = torch.arange(n, device=keys.device)
    future = own.view(1, -1) > own.view(-1, 1)  # (n, n): query i must not see key j > i
    scores[..., prefix:] = scores[..., prefix:].masked_fill(future.repeat(heads // kv_heads, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs[..., :prefix].sum(dim=2)


def observe(adapter: ModelAdapter, cache: PrunedCache, observer: Observer, token_ids: torch.Tensor | None,
            positions: torch.Tensor, observed: int, embeds: torch.Tensor | None = None) -> ObserverPass:
    """Runs `observer` after everything in the cache (committed + tail) and drops its tokens again.
    embeds: the observer's input embeddings (1, n, d) instead of `token_ids` (an example observer
    holds a picture as well as text)."""
    tails = [layer.tail for layer in cache.layers]
    hidden = embeds if embeds is not None else adapter.embed_text(token_ids)
    rotary = adapter.rotary(hidden, positions)
    inputs: list = [None] * adapter.num_layers
    n = hidden.shape[1]
    try:
        with attention_capture(adapter, cache, n) as captured:
            out = run_layers(adapter, cache, hidden, positions, record_inputs=inputs, rotary=rotary)
    finally:
        for layer, tail in zip(cache.layers, tails):
            layer.drop_tail(tail)
    reference = F.log_softmax(adapter.logits(out[:, -observed:])[0], dim=-1)
    attention = [captured[i] for i in range(adapter.num_layers)]
    return ObserverPass(observer, inputs, rotary, positions, reference, attention)


def rerun_log_probs(adapter: ModelAdapter, cache: PrunedCache, run: ObserverPass, start_layer: int) -> torch.Tensor:
    """Re-runs an observer from `start_layer` (its recorded input there) against the cache
    as it stands; returns float32 log-probabilities at the observed positions."""
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

