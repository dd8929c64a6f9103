"""Independent oracles: the published M-RoPE rule, the plain transformers model on the full
sequence, and an observer forward over transformers' own DynamicCache. None of this uses
emloc's cache, forward or observer code, so the tests compare two implementations."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache


def published_rope_index(input_ids: list[int], *, vision_start: int, image_token: int, video_token: int,
                         image_grids=(), video_grids=(), merge: int = 2,
                         tokens_per_second: float | None = None, second_per_grid: float = 1.0) -> torch.Tensor:
    """Qwen2-VL's `get_rope_index` as published (transformers 4.45; Qwen2.5-VL's temporal
    scaling from 4.49): text after a vision block starts at the block's max position + 1.
    Returns (3, len(input_ids))."""
    tokens = list(input_ids)
    images, videos = list(image_grids), list(video_grids)
    starts = [i for i, t in enumerate(tokens) if t == vision_start and i + 1 < len(tokens)]
    kinds = [tokens[i + 1] for i in starts]
    n_images, n_videos = kinds.count(image_token), kinds.count(video_token)
    pieces, st = [], 0
    for _ in range(n_images + n_videos):
        ed_image = tokens.index(image_token, st) if image_token in tokens[st:] and n_images else len(tokens) + 1
        ed_video = tokens.index(video_token, st) if video_token in tokens[st:] and n_videos else len(tokens) + 1
        if ed_image < ed_video:
            (t, h, w), ed, interval = images.pop(0), ed_image, 1.0
            n_images -= 1
        else:
            (t, h, w), ed = videos.pop(0), ed_video
            interval = 1.0 if tokens_per_second is None else second_per_grid * tokens_per_second
            n_videos -= 1
        gt, gh, gw = t, h // merge, w // merge
        text_len = ed - st
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)
        t_index = (torch.arange(gt).view(-1, 1).expand(-1, gh * gw) * interval).long().flatten()
        h_index = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
        w_index = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
        pieces.append(torch.stack([t_index, h_index, w_index]) + text_len + st_idx)
        st = ed + gt * gh * gw
    if st < len(tokens):
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(torch.arange(len(tokens) - st).view(1, -1).expand(3, -1) + st_idx)
    return torch.cat(pieces, dim=1)


def chat_question(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def chat_preamble(tokenizer, system: str) -> list[int]:
    return tokenizer.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>",
                            add_special_tokens=False)


def video_rope_kwargs(model, fps: float = 2.0) -> dict:
    vision = model.config.vision_config
    tps = getattr(vision, "tokens_per_second", None)
    return dict(merge=vision.spatial_merge_size, tokens_per_second=tps,
                second_per_grid=vision.temporal_patch_size / fps,
                vision_start=model.config.vision_start_token_id, image_token=model.config.image_token_id,
                video_token=model.config.video_token_id)


@torch.no_grad()
def plain_logits(model, input_ids: list[int], pixel_values: torch.Tensor, grid_thw, positions: torch.Tensor):
    """One plain transformers forward over the whole multimodal sequence with explicit positions."""
    out = model(input_ids=torch.tensor([input_ids]), pixel_values_videos=pixel_values,
                video_grid_thw=torch.tensor([list(grid_thw)]), position_ids=positions.unsqueeze(1))
    return out.logits[0].float()


@torch.no_grad()
def plain_greedy(model, input_ids: list[int], pixel_values, grid_thw, positions, max_new_tokens: int,
                 stop: set[int]) -> list[int]:
    """Greedy decoding by re-running the plain model on the whole sequence every step (no cache)."""
    ids, pos, out = list(input_ids), positions, []
    for _ in range(max_new_tokens):
        token = int(plain_logits(model, ids, pixel_values, grid_thw, pos)[-1].argmax())
        if token in stop:
            break
        out.append(token)
        ids.append(token)
        nxt = int(pos.max()) + 1
        pos = torch.cat([pos, torch.full((3, 1), nxt)], dim=1)
    return out


@torch.no_grad()
def observer_log_probs(model, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], token_ids: list[int],
                       positions: torch.Tensor, observed: int) -> torch.Tensor:
    """Runs `token_ids` after per-layer keys/values (lengths may differ per layer) through the
    model's decoder layers on a fresh DynamicCache; float64 log-probs of the last `observed`."""
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    for i, (k, v) in enumerate(layer_kv):
        cache.update(k.clone(), v.clone(), i)
    hidden = model.get_input_embeddings()(torch.tensor([token_ids]))
    rotary = lm.rotary_emb(hidden, positions.unsqueeze(1))
    n = hidden.shape[1]
    for i, layer in enumerate(lm.layers):
        prefix = cache.layers[i].get_seq_length()
        mask = additive_causal_mask(prefix, n, hidden.dtype)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, cache=cache)
    logits = model.lm_head(lm.norm(hidden))[0, -observed:].double()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def prefill_kv(model, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], embeds: torch.Tensor,
               positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values of every layer after prefilling `embeds` (1, n, d) behind `layer_kv`."""
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    for i, (k, v) in enumerate(layer_kv):
        cache.update(k.clone(), v.clone(), i)
    hidden, n = embeds, embeds.shape[1]
    rotary = lm.rotary_emb(hidden, positions.unsqueeze(1))
    for i, layer in enumerate(lm.layers):
        prefix = cache.layers[i].get_seq_length()
        mask = additive_causal_mask(prefix, n, hidden.dtype)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, cache=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def additive_causal_mask(prefix: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, n, prefix + n): 0 where query i may see key j (the prefix, then causal), -inf
    elsewhere; eager and sdpa attention both honour an additive float mask."""
    visible = torch.arange(prefix + n).view(1, -1) <= torch.arange(n).view(-1, 1) + prefix
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf")).view(1, 1, n, -1)


def js(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in nats, mean over rows, float64."""
    p, q = log_p.double().exp(), log_q.double().exp()
    m = 0.5 * (p + q)
    kl = lambda a, log_a: (a * (log_a.double() - m.log())).nan_to_num().sum(-1)  # noqa: E731
    return float((0.5 * kl(p, log_p) + 0.5 * kl(q, log_q)).mean())


def random_frames(n: int, height: int = 56, width: int = 84, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
