"""Qwen3.5 (dense and MoE): a hybrid decoder, three Gated DeltaNet (linear-attention) layers for every
full-attention layer, natively multimodal.

The algorithm sees only the full-attention layers: layer `i` of the adapter is full-attention decoder
layer `attention_layers[i]` run together with the linear-attention layers before it (its *block*; linear
layers after the last full-attention layer join the last block). So layer groups, ratios, the budget
and the cache count full-attention layers, and the linear layers' state (`emloc.recurrent`) rides along
with the block's `PrunedLayer`, unpruned: the recurrence has consumed every token of a chunk.

The video path is Qwen3-VL's (the same processor and position rule, without DeepStack): each temporal
step is a block after its `<t seconds>` timestamp, positions chain from the last one used, and the
full-attention layers rotate part of each head (`partial_rotary_factor`) by interleaved M-RoPE. So the
temporal-position policy is refused, for Qwen3-VL's reason (time is in the timestamp text, every axis
advances with it) and one of its own: the linear layers' state holds no position that could be turned.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

from ..errors import UnsupportedModelError
from ..recurrent import BlockCache, RecurrentStates, current_runs, run_linear
from .qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Adapter for `Qwen3_5ForConditionalGeneration` and `Qwen3_5MoeForConditionalGeneration`.

    attention_layers: decoder index of each full-attention layer (the adapter's layers).
    blocks[i]: the decoder indices run as adapter layer i, in order.
    """

    temporal_policy_refusal = (
        "Qwen3.5 carries time in the timestamp text before each frame, not on an M-RoPE axis: every position "
        "axis advances with the text, so compressing the temporal axis cannot bound its positions (and its "
        "linear-attention layers' recurrent state holds no position that could be turned back). Set "
        "temporal_range: 0; a stream then runs to the model's max_position_embeddings")

    def __init__(self, model: nn.Module, tokenizer, **options) -> None:
        super().__init__(model, tokenizer, **options)
        text = model.config.text_config
        types = list(text.layer_types)
        self.attention_layers = [d for d, kind in enumerate(types) if kind == "full_attention"]
        if not self.attention_layers or any(kind not in ("full_attention", "linear_attention") for kind in types):
            raise UnsupportedModelError(f"{type(model).__name__}: layer types {sorted(set(types))} need at least one "
                                        f"full-attention layer and no other kinds than linear_attention")
        self.blocks = [list(range(0 if i == 0 else self.attention_layers[i - 1] + 1, d + 1))
                       for i, d in enumerate(self.attention_layers)]
        self.blocks[-1] += list(range(self.attention_layers[-1] + 1, len(types)))
        self.num_layers = len(self.attention_layers)
        layer = self._decoder.layers[self.attention_layers[0]].self_attn
        self.num_kv_heads = layer.k_proj.out_features // layer.head_dim
        self.head_dim = layer.head_dim
        self._linear = {d: self._decoder.layers[d].linear_attn for d in range(len(types))
                        if types[d] == "linear_attention"}
        think = tokenizer.convert_tokens_to_ids("</think>")
        # the chat template's non-thinking turn: an empty thought, so answers start with the answer
        self._no_thought = isinstance(think, int) and think != tokenizer.unk_token_id

    # --- the decoder ---------------------------------------------------------------------
    def run_layer(self, index, hidden, mask, rotary, cache):
        """Block `index`: its linear-attention layers (state in the block's `RecurrentStates`, mask-free)
        and its full-attention layer (keys/values in `cache.layers[index]`, under `mask`)."""
        layer = cache.layers[index]
        if layer.recurrent is None:
            layer.recurrent = RecurrentStates()
        states = layer.recurrent
        states.begin(layer.tail, hidden.shape[1])
        view = BlockCache(layer, self.attention_layers[index])
        for d in self.blocks[index]:
            decoder = self._decoder.layers[d]
            if d in self._linear:
                hidden = run_linear(lambda rows, decoder=decoder: decoder(rows, position_embeddings=rotary,
                                                                           attention_mask=None, cache=view),
                                    hidden, states, d)
            else:
                hidden = decoder(hidden, attention_mask=mask, position_embeddings=rotary, cache=view)
        runs = current_runs()
        states.end(hidden.shape[1] if runs is None else runs[0])
        return hidden

    def attention_module(self, index: int) -> nn.Module:
        return self._decoder.layers[self.attention_layers[index]].self_attn

    def queries(self, index, normed_hidden, rotary):
        """The query half of `q_proj` (the other half gates the output), normed, partially rotated."""
        attn = self.attention_module(index)
        n = normed_hidden.shape[1]
        q, _gate = torch.chunk(attn.q_proj(normed_hidden).view(1, n, -1, self.head_dim * 2), 2, dim=-1)
        q = attn.q_norm(q).transpose(1, 2)
        cos, sin = rotary
        return apply_rotary_pos_emb(q, q, cos, sin)[0]

    def attention_scale(self, index: int) -> float:
        return self.attention_module(index).scaling

    def recurrent_state_shapes(self, index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        shapes = {}
        for d in self.blocks[index]:
            if d in self._linear:
                linear = self._linear[d]
                shapes[f"conv.{d}"] = ((1, linear.conv_dim, linear.conv_kernel_size), self.dtype)
                shapes[f"recurrent.{d}"] = ((1, linear.num_v_heads, linear.head_k_dim, linear.head_v_dim),
                                            torch.float32)
        return shapes

    # --- the chat format ------------------------------------------------------------------
    def question_ids(self, question: str) -> torch.Tensor:
        return self._thoughtless(super().question_ids(question))

    def template_ids(self) -> torch.Tensor:
        return self._thoughtless(super().template_ids())

    def _thoughtless(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids, self._encode("<think>\n\n</think>\n\n")]) if self._no_thought else ids
