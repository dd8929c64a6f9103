"""emloc-stream as an lmms-eval model: `lmms-eval --model emloc_stream --model_args pretrained=PATH,...`.

lmms-eval (the harness that scores video models on VideoMME, MLVU, LongVideoBench, ...) finds this class
through the Python entry point group `lmms_eval.models` (pyproject.toml), its supported plug-in route. Each
video goes through the one video job of `run` and `batch` (`stream/job.py`): decoded and sampled at the
model's fps, folded chunk by chunk into a compressed cache, then its questions answered over that cache.

Model arguments (`--model_args key=value,...`):
- `pretrained`: a checkpoint folder or hub id (default: the shipped tiny model, which knows only the
  synthetic suite);
- `config`: a YAML config as every command takes (its `emloc:` and `model:` sections);
- any other key is an `emloc:` setting (`preset=videomme_online`, `layer_groups=2`, `layer_group_size=14`,
  `token_budget=...`); without a config or settings: the product default (configs/default.yaml), the
  paper's group-wise online setting with layer groups of half the model's layers;
- `query_aware` (default false): the questions guide what the cache keeps (the paper's offline setting);
  false is the online setting, where the video is folded before its question is known;
- `max_new_tokens` (default: the config's model.max_new_tokens, 16): the longest answer, unless the task's
  generation_kwargs say otherwise.

Requests are grouped by video, so a video is folded once for all its questions (query-aware: all of them
guide its pruning, as `run --query-aware --ask ... --ask ...`). Only video tasks with one video per question
are answered; anything else is refused naming the request.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from emloc import EMLoCSettings, StreamContext
from emloc.settings import preset

from .config import Config, ConfigError, load_config
from .engine import build_model
from .job import answer_video
from .sources import open_source

MODEL_ID = "emloc_stream"
HARNESS_KEYS = {"batch_size", "max_batch_size", "device"}  # passed by lmms-eval to every model


def manifest():
    """The entry point lmms-eval reads (group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.EmlocStream")


def _settings(base: EMLoCSettings, preset_name: str | None, options: dict) -> EMLoCSettings:
    """`preset_name` with `options` over it, else `options` over `base` (a config's settings or the default's)."""
    if preset_name:
        return preset(preset_name, **options)
    data = base.to_dict()
    if "layer_groups" in options and "layer_group_size" not in options:
        data.pop("layer_group_size")  # the grouping asked for, relative to the model's depth
    return EMLoCSettings.from_dict({**data, **options})


class EmlocStream(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, config: str | None = None, query_aware: bool = False,
                 max_new_tokens: int | None = None, **options) -> None:
        super().__init__()
        harness = {k: options.pop(k) for k in list(options) if k in HARNESS_KEYS}
        if not isinstance(query_aware, bool):
            raise ConfigError(f"emloc_stream: query_aware must be true or false, got {query_aware!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ConfigError(f"emloc_stream: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        name = options.pop("preset", None)
        _settings(EMLoCSettings(), name, options)  # an unknown or bad setting is named before the model loads
        loaded = load_config(config) if config is not None else Config()
        if harness.get("device"):
            loaded = replace(loaded, model=replace(loaded.model, device=harness["device"]))
        if options or name:  # over the config's settings, or the product default's
            loaded = replace(loaded, emloc=_settings(loaded.emloc, name, options))
        if max_new_tokens is not None:
            loaded = replace(loaded, model=replace(loaded.model, max_new_tokens=max_new_tokens))
        self.config = loaded
        self.adapter, self.settings, self.label = build_model(loaded, pretrained)
        self.query_aware, self.max_new_tokens = query_aware, loaded.model.max_new_tokens

    def generate_until(self, requests: list[Instance]) -> list[str]:
        by_video: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_video[self._video(request)].append(i)
        answers: list[str | None] = [None] * len(requests)
        for video, indices in by_video.items():
            questions = [requests[i].args[0] for i in indices]
            limits = {self._max_new_tokens(requests[i].args[1]) for i in indices}
            context = StreamContext(self.adapter, settings=self.settings)
            frames = open_source(video).frames(fps=self.config.model.fps)
            for i, answer in zip(indices, answer_video(context, frames, questions, query_aware=self.query_aware,
                                                       max_new_tokens=max(limits))):
                answers[i] = answer.text
        return answers

    def _video(self, request: Instance) -> str:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if isinstance(visuals, (str, Path)):
            visuals = [visuals]
        visuals = list(visuals or [])
        if len(visuals) != 1 or not isinstance(visuals[0], (str, Path)):
            raise ValueError(f"emloc_stream answers about one video per question; task {task} doc {doc_id} gives "
                             f"{len(visuals)} visual(s) of type(s) {sorted({type(v).__name__ for v in visuals})}")
        return str(visuals[0])

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        value = (gen_kwargs or {}).get("max_new_tokens", self.max_new_tokens)
        return value if isinstance(value, int) and value > 0 else self.max_new_tokens

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("emloc_stream generates answers (generate_until tasks); it does not score "
                                  "continuations (loglikelihood tasks)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("emloc_stream answers one question per turn; multi-round tasks are not supported")
