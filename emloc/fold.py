"""One segment (a chunk of video, or of examples) from embeddings to committed cache.

    prefill -> observers -> rank the segment's tokens -> retain (per layer group) -> commit -> budget

All or nothing: if any step fails, every layer's cache is put back as it was (method.md, section 2).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .adapters.base import rank_with_frames
from .budget import enforce_budget
from .fold_observers import confirm_probe_answer, decodes_probe_answer, template_attention
from .forward import LayerWork, counting_layers, run_layers
from .observer import observe_together
from .policies import FoldState
from .scorers import ChunkView, attention_share

if TYPE_CHECKING:
    from .context import StreamContext


def fold_segment(context: StreamContext, embeds: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor,
                 make_runs, frame_text: torch.Tensor | None = None) -> dict:
    """Prefills a segment (1, n, d) at `positions` (3, n), runs the observers after it
    (`make_runs(first free position)`: the first in the prefill's own pass, the others together in
    one more), ranks its tokens, lets the policy choose what each
    layer keeps, commits, and enforces the budget. All or nothing.

    steps: (n,) the temporal step (or example) of each token; frame_text: (n,) booleans, a frame's
    own text (kept with its frame). Returns the fold's part of its `FoldRecord`, and `probe_answer`,
    the answer to carry (None: none)."""
    adapter, cache, settings, policy = context.adapter, context.cache, context.settings, context.policy
    n = embeds.shape[1]
    before = cache.lengths()
    with cache.saved(), counting_layers() as work:  # all or nothing: a failure puts every layer back
        max_position = max(context.max_position, int(positions.max()))
        # a fresh decode of the probe's answer needs the chunk in the cache before the runs exist
        decode_first = decodes_probe_answer(settings, context.probe_answer)
        clock = time.perf_counter()
        runs = make_runs(max_position + 1) if policy.needs_observers and not decode_first else []
        if runs:  # the first observer rides in the chunk's prefill pass: it comes right after the chunk
            passes, rows = observe_together(adapter, cache, runs[:1], lead=(embeds, positions))
            runs = runs[1:]
        else:
            run_layers(adapter, cache, embeds, positions)
            passes, rows = [], []
        prefill_s = time.perf_counter() - clock

        clock = time.perf_counter()
        if decode_first and policy.needs_observers:
            runs = make_runs(max_position + 1)
        together = adapter.attention_implementation in FoldState.BATCHED_ATTENTION
        for batch in ([runs] if together else [[run] for run in runs]) if runs else []:
            more, more_rows = observe_together(adapter, cache, batch)
            passes, rows = passes + more, rows + more_rows
        passes, probe_answer = confirm_probe_answer(context, passes, rows)
        observe_s = time.perf_counter() - clock

        clock = time.perf_counter()
        chunk_keys = [layer.tail_keys().clone() for layer in cache.layers]
        chunk_values = [layer.tail_values().clone() for layer in cache.layers]
        template = template_attention(context, max_position + 1, before) if context.scorer.needs_template else None
        view = ChunkView(chunk_keys, chunk_values, adapter.rotary(embeds, positions), steps,
                         [[p.attention[i][..., before[i]:] for p in passes] for i in range(adapter.num_layers)],
                         template)
        importance = [context.scorer.score(view, i) for i in range(adapter.num_layers)]
        if frame_text is not None:  # a frame's own text (Qwen3-VL's timestamp) is kept with the frame
            importance = [rank_with_frames(scores, steps, frame_text) for scores in importance]
        prefix_attention = [[p.attention[i][..., :before[i]] for p in passes] for i in range(adapter.num_layers)]
        score_s = time.perf_counter() - clock

        clock = time.perf_counter()
        merge = ([F.normalize(view.unrotated_keys(i), dim=-1) for i in range(adapter.num_layers)]
                 if settings.merge_dropped else None)
        state = FoldState(adapter, cache, chunk_keys, chunk_values, importance, steps, passes, merge)
        retention = policy.retain(state)
        search_s = time.perf_counter() - clock
        kept = commit(context, state, retention.keep, prefix_attention)
        evicted = policy.evict(cache, context.sink_tokens)
        if settings.token_budget is not None:
            budget = enforce_budget(cache, settings.token_budget, context.sink_tokens)
            evicted = [a + b for a, b in zip(evicted, budget)]
    context.tokens_seen += n
    context.max_position = max_position
    return dict(chunk_tokens=n, groups=retention.groups, kept=kept, evicted=evicted, tokens_before=before,
                observers=[p.observer for p in passes], max_position=max_position, prefill_s=prefill_s,
                observe_s=observe_s, search_s=search_s, evaluations=state.evaluations, score_s=score_s,
                probe_answer=probe_answer, work=LayerWork(work.calls, work.token_layers))


def commit(context: StreamContext, state: FoldState, keep: list,
           prefix_attention: list[list[torch.Tensor]]) -> list[int]:
    """Puts each layer's retained chunk tokens after its committed ones. With an attention
    scorer, the committed tokens' importance also moves towards what this fold's observers
    looked at: each observer's attention share among the committed video tokens (mean 1,
    like a chunk's scores), weighted 1 - importance_decay."""
    adapter, decay = context.adapter, context.settings.importance_decay
    chunk_origins = torch.arange(context.tokens_seen, context.tokens_seen + state.chunk_len, device=adapter.device)
    chunk_origins = chunk_origins.view(1, 1, -1).expand(1, adapter.num_kv_heads, -1)
    kept = []
    for i, layer in enumerate(context.cache.layers):
        state.apply({i: keep[i]})
        origins, importance = chunk_origins, state.importance[i]
        if keep[i] is not None:
            origins, importance = torch.gather(origins, 2, keep[i]), torch.gather(importance, 2, keep[i])
        if context.scorer.needs_attention and prefix_attention[i]:
            old = layer.committed_importance()
            old.mul_(decay).add_((1 - decay) * attention_share(prefix_attention[i], skip=context.sink_tokens))
        layer.commit_tail(origins, importance)
        kept.append(origins.shape[-1])
    return kept
