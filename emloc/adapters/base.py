"""What the EMLoC algorithm needs from a model family, and nothing more.

An adapter owns everything that differs between families: how frames become
vision tokens, how M-RoPE positions are laid out, where the decoder layers are,
how a layer is called, how observer queries are formed, and the chat format.
The algorithm (`emloc.fold`, `emloc.forward`, policies) only talks to this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError


def check_attention(name: str) -> str:
    """Returns `name` if it is an attention implementation whose masks transformers knows how
    to build (eager, sdpa, flex_attention, flash_attention_*); else says which ones work.
    Paged attention needs the library's paged cache, not ours."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if not isinstance(name, str) or name.startswith("paged") or name not in ALL_MASK_ATTENTION_FUNCTIONS:
        usable = sorted(k for k in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith("paged"))
        raise UnsupportedModelError(f"attention implementation {name!r} is not supported on the pruned cache; "
                                    f"load the model with attn_implementation set to one of {usable}")
    return name


def rank_with_frames(importance: torch.Tensor, steps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(1, kv_heads, n) importance in which each frame-text token (`text`: (n,) bool) scores just below the
    best vision token of its frame (`steps`: (n,) each token's frame), per head: a top-k selection then keeps
    a frame's text only together with that token, and right after it."""
    heads = importance.shape[1]
    vision = importance.float().masked_fill(text.view(1, 1, -1), float("-inf"))
    best = vision.new_full((1, heads, int(steps.max()) + 1), float("-inf")).scatter_reduce(
        2, steps.view(1, 1, -1).expand(1, heads, -1).to(importance.device), vision, "amax")[..., steps]
    below = best - (best.abs() * 1e-6 + 1e-9)  # below the frame's best, above anything below it but ties
    return torch.where(text.view(1, 1, -1).to(importance.device), below, importance.float()).to(importance.dtype)


@dataclass
class VideoPixels:
    """A chunk of frames in the model's input layout.

    pixel_values: (grid_t * grid_h * grid_w, patch_dim) patches.
    grid_thw: (grid_t, grid_h, grid_w) in patches, before spatial merging.
    padded_frames: frames repeated at the end to fill the last temporal patch.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    padded_frames: int = 0
    # the chunk's first temporal step in its video: families that write each step's time as text
    # (Qwen3-VL's `<t seconds>`) need it to build the chunk; the context sets it before encoding
    first_step: int = 0


class ModelAdapter(ABC):
    """One model family behind one small interface."""

    model: nn.Module
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    temporal_patch: int
    # Temporal positions the checkpoint reads a video over (None: no known limit).
    # Past it, a stream compresses its video's temporal positions (`StreamContext`).
    temporal_range: int | None = None
    # True: a chunk's positions continue from the last position used (each frame a block after the
    # text before it: Qwen3-VL, 1D-RoPE families) instead of from the video's start plus the step offset.
    chains_positions: bool = False
    # Why the family cannot compress its video's temporal positions (None: it can, with `shift_keys`).
    temporal_policy_refusal: str | None = None

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model: nn.Module, tokenizer, path_or_id: str, **options) -> ModelAdapter:
        """The adapter for a loaded checkpoint, with whatever else the family reads from it."""

    # --- inputs ------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, frames: torch.Tensor) -> VideoPixels:
        """(T, H, W, 3) uint8 RGB frames -> patches for the vision tower."""

    @abstractmethod
    def encode_video(self, pixels: VideoPixels) -> torch.Tensor:
        """Vision tower: patches -> (1, n_tokens, hidden) embeddings."""

    @abstractmethod
    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (1, n, hidden) embeddings."""

    # --- positions ---------------------------------------------------------------
    @abstractmethod
    def video_positions(self, video_start: int, first_step: int, pixels: VideoPixels,
                        scale: float = 1.0) -> torch.Tensor:
        """(3, n_tokens) positions of a chunk whose first temporal step is `first_step`
        of a video whose positions start at `video_start`; the temporal axis's offset from
        `video_start` multiplied by `scale` (1: integer positions, as the model's own processor)."""

    @abstractmethod
    def temporal_offsets(self, steps: torch.Tensor) -> torch.Tensor:
        """Unscaled temporal position offsets (from the video's start) of temporal steps `steps`."""

    @abstractmethod
    def shift_keys(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Cached keys (1, kv_heads, n, head_dim), already rotated, moved by `shift` (1, kv_heads, n)
        positions along the temporal axis only, as if they had been rotated there to begin with."""

    def token_steps(self, pixels: VideoPixels, n: int) -> torch.Tensor:
        """(n,) the temporal step (from the chunk's first) of each of the chunk's `n` tokens; by default
        every step holds the same number of tokens."""
        t = pixels.grid_thw[0]
        return torch.arange(t).repeat_interleave(n // t)

    def frame_text(self, pixels: VideoPixels, n: int) -> torch.Tensor | None:
        """(n,) True at the chunk's tokens that are text about their frame (Qwen3-VL's timestamp and vision
        markers), which pruning ranks with the frame (`rank_with_frames`); None: the chunk is vision only."""
        return None

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        """(3, n): text advances all three position axes together."""
        return (torch.arange(n) + start).view(1, -1).expand(3, -1).clone()

    # --- the decoder --------------------------------------------------------------
    @abstractmethod
    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions (3, n), shared by every layer."""

    @abstractmethod
    def run_layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                  rotary: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        """One decoder layer, attending to `cache` (which it updates)."""

    @abstractmethod
    def attention_module(self, index: int) -> nn.Module:
        """The module whose input is the layer's normed hidden state (observer hooks)."""

    @abstractmethod
    def queries(self, index: int, normed_hidden: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotated queries (1, heads, n, head_dim) of layer `index` for its attention input."""

    @abstractmethod
    def attention_scale(self, index: int) -> float:
        """The softmax scale of layer `index`."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over the last layer's output, in float32."""

    def recurrent_state_shapes(self, index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """A hybrid model's linear-attention states that layer `index` (a full-attention layer, run with
        the linear-attention layers feeding it) carries: name (`conv.<d>`, `recurrent.<d>` for decoder
        layer d) -> (shape, dtype); none for a model whose every layer is attention (the default)."""
        return {}

    # --- the chat format ----------------------------------------------------------
    @abstractmethod
    def preamble_ids(self, system_prompt: str) -> torch.Tensor:
        """Tokens before the first frame (system turn, user turn, vision start)."""

    @abstractmethod
    def question_ids(self, question: str) -> torch.Tensor:
        """Tokens that close the video and ask `question`, up to the assistant's turn."""

    def template_ids(self) -> torch.Tensor:
        """Tokens that close the video and open the assistant's turn with no question: the
        proxy query of the 'template' scorer."""
        raise NotImplementedError(f"{type(self).__name__} has no assistant-turn template")

    def answer_ids(self, answer: str) -> torch.Tensor:
        """An example's answer as the assistant's tokens (without the turn's end)."""
        raise NotImplementedError(f"{type(self).__name__} has no example format")

    def example_ids(self, question: str, answer: str) -> torch.Tensor:
        """Tokens that close an example's picture, ask `question`, give `answer` as the assistant's
        turn and open the next user turn up to the next picture (a task pack's examples)."""
        raise NotImplementedError(f"{type(self).__name__} has no example format")

    @abstractmethod
    def stop_ids(self) -> set[int]:
        """Token ids that end an answer."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Answer tokens -> text."""

    def identity(self) -> dict:
        """What a saved cache is only valid for: the family, the architecture, and the weights
        (a digest of every parameter's name, shape and first values, cheap even for 7B). Computed
        once: a stream saves its state every chunk and the weights do not change under it."""
        import hashlib

        if getattr(self, "_identity", None) is not None:
            return self._identity

        config = self.model.config.to_dict()
        # emloc_temporal_range is how positions are read, not what the cache holds: a state whose halvings
        # contradict it is refused by its own check (stream/state.py), a task pack never depends on it;
        # emloc_model_note is words about the model, not the model
        for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation",
                         "emloc_temporal_range", "emloc_model_note"):
            config.pop(volatile, None)
        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
        text = repr(sorted((k, repr(v)) for k, v in config.items()))
        self._identity = dict(family=type(self).__name__, model_type=self.model.config.model_type,
                              config_sha256=hashlib.sha256(text.encode()).hexdigest(),
                              weights_sha256=digest.hexdigest())
        return self._identity

    @property
    def model_note(self) -> str | None:
        """What the checkpoint says of itself, shown when a command starts and in every answer's metadata:
        `emloc_model_note` in its config.json (the shipped models: synthetic video only, see stream/models/).
        None for a checkpoint that says nothing, as real ones do."""
        note = getattr(self.model.config, "emloc_model_note", None)
        return note.strip() if isinstance(note, str) and note.strip() else None

    @property
    @abstractmethod
    def attention_implementation(self) -> str:
        """The decoder's transformers attention implementation (eager, sdpa, flash_attention_2, ...)."""

    @property
    def uses_flash_attention(self) -> bool:
        return self.attention_implementation.startswith("flash_attention")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class TransformersDecoder:
    """The decoder half of an adapter whose language model is a transformers decoder `self._decoder`
    (layers with a `self_attn` that has `q_proj` and `scaling`; `rotary_emb`; a final `norm`) under
    `self.model.lm_head`. Mixed in before ModelAdapter; `apply_rotary` is the family's own rotation
    (the modeling file's `apply_rotary_pos_emb`), so one method serves every such family."""

    apply_rotary: staticmethod

    @property
    def attention_implementation(self) -> str:
        return self._decoder.config._attn_implementation

    def run_layer(self, index, hidden, mask, rotary, cache):
        return self._decoder.layers[index](hidden, attention_mask=mask, position_embeddings=rotary, cache=cache)

    def attention_module(self, index: int) -> nn.Module:
        return self._decoder.layers[index].self_attn

    def queries(self, index, normed_hidden, rotary):
        attn = self._decoder.layers[index].self_attn
        n = normed_hidden.shape[1]
        q = attn.q_proj(normed_hidden).view(1, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        return self.apply_rotary(q, q, cos, sin)[0]

    def attention_scale(self, index: int) -> float:
        return self._decoder.layers[index].self_attn.scaling

    def logits(self, hidden):
        return self.model.lm_head(self._decoder.norm(hidden)).float()


class ChatMLText:
    """The text half of an adapter whose tokenizer speaks ChatML (`<|im_end|>`, `<|endoftext|>` in
    `self._special`): answers, stops and decoding are the same for every such family."""

    def answer_ids(self, answer: str) -> torch.Tensor:
        """An example's answer as plain text (control tokens in it are read as characters)."""
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"an example's answer must be a non-empty string, got {answer!r}")
        return torch.tensor(self.tokenizer.encode(answer, add_special_tokens=False, split_special_tokens=True),
                            dtype=torch.long)

    def stop_ids(self) -> set[int]:
        return {self._special["<|im_end|>"], self._special["<|endoftext|>"]}

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
