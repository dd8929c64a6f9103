"""The training-only targets of research/train_tiny.py: the attention it teaches is the model's own
attention (recomputed by separate code here: the eager implementation's weights), and the look
targets point at the object the question names (read from the generator's owner map)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "research"))

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.models import CAMERA_MODEL, DEFAULT_MODEL  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

MODEL = CAMERA_MODEL
SEEDS = [10_000_001, 10_000_002]


def camera_batch(frames: int, **options):
    """The shipped camera model, and a camera-suite Batcher's inputs and question kinds for SEEDS at
    `frames` frames (options: the Batcher's)."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(MODEL).eval()
    batcher = T.Batcher(model, tiny_tokenizer(WORDS + list(synthetic_camera.WORDS)), task=synthetic_camera, **options)
    inputs, _, _, kinds = batcher(SEEDS, frames)
    return model, inputs, kinds


def batch():
    return camera_batch(32, describe=True, look=True, look_first=True)


def eager_attentions(model, embeds, inputs: dict) -> tuple:
    """The reference: every layer's eager attention weights, the boolean mask made additive (eager adds a
    boolean mask as 0/1)."""
    additive = torch.zeros(inputs["attention_mask"].shape).masked_fill(~inputs["attention_mask"], float("-inf"))
    model.model.language_model.config._attn_implementation = "eager"
    try:
        return model.model.language_model(inputs_embeds=embeds, output_attentions=True,
                                           **{**inputs, "attention_mask": additive}).attentions
    finally:
        model.model.language_model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("appearances", [False, True])
def test_look_attention_is_the_models_attention(appearances):
    model, inputs, _ = appearance_batch(32) if appearances else batch()
    _, at, head, *_ = inputs["cell_labels"]
    assert set(head.flatten().tolist()) == ({0, 1, 2, 3} if appearances else {0, 1})
    inputs = dict(inputs)
    inputs.pop("cell_labels")
    with torch.no_grad():
        video = model.model.visual(inputs.pop("pixel_values_videos"),
                                   grid_thw=inputs.pop("video_grid_thw")).pooler_output
        ids = inputs.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == model.config.video_token_id).unsqueeze(-1), video)
        looked = T.CopyAttention(model, inputs["attention_mask"], T.LOOK_LAYER)
        model.model.language_model(inputs_embeds=embeds, **inputs)  # sdpa, boolean mask: as in training
        mine = looked(at, head)
        attentions = eager_attentions(model, embeds, inputs)
    reference = attentions[T.LOOK_LAYER][torch.arange(len(SEEDS)).unsqueeze(-1), head, at]
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


def expected_looks(video, kinds: list[str], steps: int, per_step: int = 16) -> list[tuple[int, list[int]]]:
    """(head, token indices in the video) per branch, from the owner map: what a 28 px cell mostly shows."""
    cut = int(np.random.default_rng(video.seed + 1).integers(max(2, steps // 4), steps))
    objects = list(video.events) + list(video.distractors)

    def tokens_of(shape: str, before: int) -> list[int]:
        found = []
        for step in range(before):
            for cell in range(per_step):
                y, x = divmod(cell, 4)
                patch = video.owner[step, 28 * y:28 * y + 28, 28 * x:28 * x + 28].astype(int)
                counts = np.bincount(patch.flatten(), minlength=2 + len(objects))[1:]
                top = int(counts.argmax()) + 1
                if counts.max() >= 0.25 * 784 and top >= 2 and top - 2 < len(video.events) \
                        and video.events[top - 2].shape == shape:
                    found.append(step * per_step + cell)
        return found

    first = min((e for e in video.events if e.shape in ("square", "circle")), key=lambda e: e.start).shape
    objects_of = {"needle": ["triangle"], "when": ["triangle"], "order": [first],
                  "colour:square": ["square"], "colour:circle": ["circle"]}
    looks = []
    for kind in kinds:
        if kind in objects_of:
            found = sorted(t for shape in objects_of[kind] for t in tokens_of(shape, steps))
            looks.append((0, found))
        elif kind in ("count", "count@cut", "state", "state@cut"):
            last = (steps if "@" not in kind else cut) - 1
            looks.append((1, [last * per_step + c for c in (range(per_step) if "count" in kind else [0])]))
    return [(h, t) for h, t in looks if t]


def test_look_targets_are_the_object_asked_about():
    model, inputs, kinds = batch()
    _, at, head, look = inputs["cell_labels"]
    for row, seed in enumerate(SEEDS):
        video = synthetic_camera.make_video(seed, frames=32)
        start = int((inputs["input_ids"][row] == model.config.video_token_id).nonzero()[0])
        got = [(int(head[row, t]), (look[row, t].nonzero().flatten() - start).tolist())
               for t in range(at.shape[1]) if look[row, t].any()]
        assert got == expected_looks(video, kinds, steps=16)
        questions = (inputs["input_ids"][row] == model.config.video_token_id).sum()
        assert all(int(at[row, t]) > start + questions for t in range(len(got))), "looks from the questions"


def test_the_benchmarks_needle_tokens_are_the_training_labels_triangle():
    """benchmarks/agnostic.py reports how much of the needle the cache kept; its needle tokens (own
    code) must be the tokens the training labels call the triangle, on both suites."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import agnostic

    from stream.suites import synthetic

    for seed in (3, 8):
        video = synthetic_camera.make_video(seed, frames=64, needle_before=0.1)
        labels = T.camera_cell_labels(video, 32, 16)
        triangle = np.flatnonzero((labels[:, 0] == T.CAMERA_SHAPES.index("triangle")).numpy())
        assert len(triangle) >= 1
        assert np.array_equal(agnostic.needle_tokens(video, 16), triangle)
        video = synthetic.make_video(seed, frames=64)
        labels = T.cell_labels(video, 32, 4)
        triangle = np.flatnonzero((labels[:, 0] == T.SHAPES.index("triangle")).numpy())
        assert np.array_equal(agnostic.needle_tokens(video, 4), triangle)


def appearance_batch(frames: int = 64):
    return camera_batch(frames, describe=True, look=True, appearances="frame")


def test_appearance_labels_are_the_answers():
    """The --appearance-targets columns, checked against the generator's own events and answers."""
    for seed in range(50):
        video = synthetic_camera.make_video(10_000_000 + seed, frames=64 + 64 * (seed % 3))
        steps = len(video.frames) // 2
        labels = T.camera_cell_labels(video, steps, 16).reshape(steps, 16, -1)
        assert (labels[:, :, 7:9] == labels[:, :1, 7:9]).all() and (labels[:, :, 10] == labels[:, :1, 10]).all()
        stars = [e for e in video.events if e.shape == "star"]
        assert int(labels[:, 0, 8].sum()) == len(stars) == synthetic_camera.COUNT_WORDS.index(
            video.question("count").answer)
        shown = torch.zeros(steps, dtype=torch.long)
        for e in stars:
            shown[e.start:e.end] = 1
        assert torch.equal(labels[:, 0, 7], shown)
        order = labels[:, :, 9][labels[:, :, 9] >= 0]
        assert len(order) and set(order.tolist()) == {["square", "circle"].index(video.question("order").answer)}
        passed = labels[:, 0, 10].float() / 2  # mean over the video = 1 - middle / steps: the third follows
        third = min(2, int(3 * (1 - float(passed.mean())) + 1e-9))
        assert synthetic_camera.WHEN_WORDS[third] == video.question("when").answer
        for e in video.events:  # "seen earlier" starts after the shape's own appearance, not within it
            if e.shape in ("square", "circle"):
                column = labels[:, 0, 3 if e.shape == "square" else 4]
                assert column[:e.end].sum() == 0 and column[e.end:].all()


def test_appearance_looks_count_onsets_and_read_evenly():
    model, inputs, kinds = appearance_batch()
    _, at, head, look, spread = inputs["cell_labels"]
    assert set(head[look.sum(-1) > 0].tolist()) == {0, 1, 2, 3}
    for row, seed in enumerate(SEEDS):
        video = synthetic_camera.make_video(seed, frames=64)
        start = int((inputs["input_ids"][row] == model.config.video_token_id).nonzero()[0])
        cut = int(np.random.default_rng(seed + 1).integers(8, 32))
        rows = [t for t in range(at.shape[1]) if look[row, t].any()]
        assert torch.allclose(look[row, rows].sum(-1), torch.where(spread[row, rows], 1.0, look[row, rows].sum(-1)))
        counts = [t for t in rows if int(head[row, t]) == 2]
        assert len(counts) == 2  # count at the end and at the cut
        for t, before in zip(counts, (32, cut)):
            k = sum(1 for e in video.events if e.shape == "star" and e.start < before)
            assert abs(float(look[row, t, start - 1]) - 1 / (k + 1)) < 1e-6  # the sink's share says k
            onsets = (look[row, t, start:] > 0).nonzero().flatten() // 16
            assert sorted(set(onsets.tolist())) == sorted(e.start for e in video.events
                                                           if e.shape == "star" and e.start < before)
        evenly = [t for t in rows if int(head[row, t]) == 3]
        assert len(evenly) == 1 and bool(spread[row, evenly[0]])
        assert torch.equal(look[row, evenly[0]].nonzero().flatten(), torch.arange(start, start + 32 * 16))
        order = [t for t in rows if int(head[row, t]) == 0 and int(at[row, t]) == max(
            int(at[row, u]) for u in rows if int(head[row, u]) == 0 and not spread[row, u])]
        assert order  # without --look-first the order question looks at both shapes


def test_distribution_target_loss_is_the_cross_entropy():
    probs = torch.softmax(torch.randn(2, 3, 7), -1)
    targets = torch.zeros(2, 3, 7)
    targets[0, 0, [1, 2]] = torch.tensor([0.25, 0.75])  # a distribution
    targets[0, 1, [3, 5]] = 1.0  # a mass target
    targets[1, 0, 6] = 1.0  # a mass target; rows (0, 2), (1, 1), (1, 2) have none
    spread = torch.zeros(2, 3, dtype=torch.bool)
    spread[0, 0] = True
    expected = torch.stack([-(0.25 * probs[0, 0, 1].log() + 0.75 * probs[0, 0, 2].log()),
                            -(probs[0, 1, 3] + probs[0, 1, 5]).log(), -probs[1, 0, 6].log()]).mean()
    torch.testing.assert_close(T.attention_target_loss(probs, targets, spread), expected)
    torch.testing.assert_close(T.attention_target_loss(probs, targets > 0), torch.stack(
        [-(probs[0, 0, 1] + probs[0, 0, 2]).log(), -(probs[0, 1, 3] + probs[0, 1, 5]).log(),
         -probs[1, 0, 6].log()]).mean())


def test_answer_loss_weights_the_answer_words():
    logits, targets = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    targets[2, 4] = -100  # padding
    torch.testing.assert_close(T.answer_loss(logits, targets, 2), torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten()))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    expected = (4 * ce[:, :2].sum() + ce[:, 2:][targets[:, 2:] != -100].sum()) / (4 * 6 + 8)
    torch.testing.assert_close(T.answer_loss(logits, targets, 2, weight=4.0), expected)


@pytest.mark.parametrize("budget", [["--minutes", "0.0001"], ["--minutes", "30", "--cpu-minutes", "0.0001"],
                                    ["--minutes", "0.0001", "--init", str(DEFAULT_MODEL)]])
def test_a_run_stops_on_its_budget_and_declares_the_positions_it_trained_on(tmp_path, budget):
    """One step (either budget spent after it), the last step evaluated and saved: the config declares
    the temporal positions of the longest length trained on (32 frames: 16), not its init's (256)."""
    import json

    out = tmp_path / "model"
    T.main(["--out", str(out), "--lengths", "32", "--batch", "2", "--eval-per-kind", "2", "--eval-at-end",
            "--warmup", "1", "--threads", "1", "--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
            "--vision-depth", "1", "--vision-dim", "16", *budget])
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 1 and training["best"]["step"] == 1
    assert json.loads((out / "config.json").read_text())["emloc_temporal_range"] == 16


def test_a_run_that_never_evaluated_still_reports(tmp_path):
    import json

    out = tmp_path / "model"
    T.main(["--out", str(out), "--lengths", "32", "--batch", "2", "--minutes", "0.0001", "--threads", "1",
            "--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vision-depth", "1",
            "--vision-dim", "16"])
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 1 and training["best"] is None and not (out / "config.json").exists()


def star_cells(video, index: int, step: int, lead: bool) -> list[int]:
    """The cells (reading order) that show star `index` at `step`: any of its pixels, or with `lead`
    (`--lead-cells`) at least half as many as its best-covered cell of that frame pair (its solid cells)."""
    mine = [int((video.owner[step, 28 * y:28 * y + 28, 28 * x:28 * x + 28] == 2 + index).sum())
            for y in range(4) for x in range(4)]
    return [cell for cell in range(16) if mine[cell] and (2 * mine[cell] >= max(mine) or not lead)]


@pytest.mark.parametrize("lead", [False, True])
def test_local_appearance_labels_are_the_stars_own_tokens(lead):
    """Columns 11-12 (`--appearance-targets local`) from the owner map by separate code: the cells that show
    a star; its onset is those cells at its first frame pair, or with `lead` only the first of them (in
    reading order): one lead cell per appearance."""
    for seed in range(6):
        video = synthetic_camera.make_video(10_000_000 + seed, frames=128)
        labels = T.camera_cell_labels(video, 64, 16, lead=lead).reshape(64, 16, -1)
        shown = np.zeros((64, 16), dtype=int)
        onset = np.full((64, 16), -100)
        for index, event in enumerate(video.events):
            if event.shape != "star":
                continue
            for step in range(event.start, event.end):
                cells = star_cells(video, index, step, lead)
                shown[step, cells] = 1
                onset[step, cells] = int(step == event.start)
                if step == event.start and lead:
                    onset[step, cells[1:]] = 0
        assert np.array_equal(labels[:, :, 11].numpy(), shown) and np.array_equal(labels[:, :, 12].numpy(), onset)
        stars = sum(e.shape == "star" for e in video.events)
        assert ((onset == 1).sum() == stars) if lead else ((onset == 1).sum() > stars)


@pytest.mark.parametrize("lead", [False, True])
def test_local_count_looks_at_the_onsets_own_tokens(lead):
    model, inputs, _ = camera_batch(64, describe=True, look=True, appearances="local", lead_cells=lead)
    _, at, head, look, spread = inputs["cell_labels"]
    for row, seed in enumerate(SEEDS):
        video = synthetic_camera.make_video(seed, frames=64)
        labels = T.camera_cell_labels(video, 32, 16, lead=lead)
        start = int((inputs["input_ids"][row] == model.config.video_token_id).nonzero()[0])
        t = next(t for t in range(at.shape[1]) if int(head[row, t]) == 2)  # the count at the end
        k = sum(e.shape == "star" for e in video.events)
        assert abs(float(look[row, t, start - 1]) - 1 / (k + 1)) < 1e-6
        assert torch.equal((look[row, t, start:start + 512] > 0).nonzero().flatten(),
                           (labels[:, 12] == 1).nonzero().flatten())
        first = min((e for e in video.events if e.shape in ("square", "circle")), key=lambda e: e.start).shape
        objects = [u for u in range(at.shape[1]) if int(head[row, u]) == 0 and look[row, u].any()]
        order = objects[1]  # needle, order, the square's colour, the circle's colour (when reads with head 3)
        looked = {int(labels[p - start, 0]) for p in look[row, order].nonzero().flatten().tolist()}
        assert looked == {T.CAMERA_SHAPES.index(first)}  # only the shape shown first


def test_balanced_shape_loss_is_the_mean_over_shapes():
    logits, labels = torch.randn(7, 4), torch.tensor([0, 0, 0, 1, 2, 2, -100])
    per = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    weighted = torch.nn.functional.cross_entropy(logits, labels, weight=T.balanced_weights(labels, 4),
                                                 ignore_index=-100)
    torch.testing.assert_close(weighted, (per[:3].mean() + per[3] + per[4:6].mean()) / 3)
    probe = T.CellProbe(8, 4, (2, 2), balanced=True)
    cells = torch.tensor([[0, 0, -100, 0, 0], [0, 0, -100, 0, 0], [3, 1, -100, 1, 0]])
    vision = torch.randn(3, 8)
    plain = T.CellProbe(8, 4, (2, 2))
    plain.load_state_dict(probe.state_dict())
    assert not torch.allclose(probe.loss(vision, vision, cells), plain.loss(vision, vision, cells))


@pytest.mark.parametrize("lead", [False, True])
def test_lookback_targets_are_what_each_token_has_seen(lead):
    """`--lookback` targets from the owner map by separate code, token by token: the triangle's cells so
    far (else the sink), at the square's cells the circle's earlier cells and the reverse, at a star's cells
    the star cells of the frame pair before, and with `lead` the earlier ones of its own (else the sink: an
    onset's cells, or with `lead` its lead cell, one per appearance)."""
    for seed in range(4):
        video = synthetic_camera.make_video(10_000_000 + seed, frames=64)
        labels = T.camera_cell_labels(video, 32, 16, lead=lead)
        queries, targets = T.lookback_targets(labels, 16, lead)

        def cells(shape: str, video=video) -> set[int]:  # cells it owns: most of any object, >= a quarter
            found = set()
            for index, event in enumerate(video.events):
                if event.shape != shape:
                    continue
                for step in range(event.start, event.end):
                    for cell in range(16):
                        y, x = divmod(cell, 4)
                        patch = video.owner[step, 28 * y:28 * y + 28, 28 * x:28 * x + 28].astype(int)
                        share = np.bincount(patch.flatten(), minlength=256)
                        mine, top = share[2 + index], share[1:].max()
                        if mine == top and mine >= 0.25 * 784:
                            found.add(step * 16 + cell)
            return found

        triangle, square, circle = cells("triangle"), cells("square"), cells("circle")
        star = {step * 16 + cell for index, event in enumerate(video.events) if event.shape == "star"
                for step in range(event.start, event.end) for cell in star_cells(video, index, step, lead)}
        expected = {0: {}, 1: {}, 2: {}}
        for i in range(512):
            seen = {j for j in triangle if j <= i}
            expected[0][i] = seen or {"sink"}
            if i in square or i in circle:
                other = circle if i in square else square
                expected[1][i] = {j for j in other if j <= i} or {"sink"}
            if i in star:
                expected[2][i] = {j for j in star if j // 16 == i // 16 - 1
                                  or (lead and j // 16 == i // 16 and j < i)} or {"sink"}
        for h in range(3):
            assert set(queries[h].nonzero().flatten().tolist()) == set(expected[h])
            for i, want in expected[h].items():
                got = {"sink" if c == 0 else c - 1 for c in targets[h, i].nonzero().flatten().tolist()}
                assert got == want, (seed, h, i)
        onsets = {i for i, want in expected[2].items() if want == {"sink"}}  # with `lead`, one per appearance
        assert onsets == set((labels[:, 12] == 1).nonzero().flatten().tolist())
        assert (len(onsets) == sum(e.shape == "star" for e in video.events)) == lead


def test_lookback_attention_is_the_models_attention():
    model, inputs, _ = camera_batch(32, look=True, appearances="local", lookback=True)
    start, queries, targets = inputs.pop("lookback")
    assert start == int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    embeds, _, _, _, rest = T.embed_inputs(model, inputs)
    captured = T.LayerInput(model, T.LOOKBACK_LAYER)
    n = queries.shape[-1]
    with torch.no_grad():
        model.model.language_model(inputs_embeds=embeds, **rest)  # sdpa, boolean mask: as in training
        mine = captured.attention(rest["attention_mask"], T.LOOKBACK_HEADS, slice(start, start + n),
                                  slice(start - 1, start + n))
        attentions = eager_attentions(model, embeds, rest)
    reference = attentions[T.LOOKBACK_LAYER][:, list(T.LOOKBACK_HEADS), start:start + n, start - 1:start + n]
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)
    # the loss: -log of each query's mass on its targets, averaged per head, then over the heads
    per_head = [-(reference[:, h] * targets[:, h]).sum(-1).clamp_min(1e-6).log()[queries[:, h]].mean()
                for h in range(3) if queries[:, h].any()]
    captured = T.LayerInput(model, T.LOOKBACK_LAYER)
    with torch.no_grad():
        model.model.language_model(inputs_embeds=embeds, **rest)
        torch.testing.assert_close(T.lookback_loss(captured, rest["attention_mask"], (start, queries, targets)),
                                   torch.stack(per_head).mean(), atol=1e-5, rtol=0)


def test_order_reads_both_shapes_with_lookback():
    model, inputs, _ = camera_batch(64, describe=True, look=True, appearances="local", lookback=True)
    _, at, head, look, _ = inputs["cell_labels"]
    start = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    for row, seed in enumerate(SEEDS):
        labels = T.camera_cell_labels(synthetic_camera.make_video(seed, frames=64), 32, 16)
        objects = [u for u in range(at.shape[1]) if int(head[row, u]) == 0 and look[row, u].any()]
        looked = {int(labels[p - start, 0]) for p in look[row, objects[1]].nonzero().flatten().tolist()}
        assert looked == {T.CAMERA_SHAPES.index("square"), T.CAMERA_SHAPES.index("circle")}


def test_grown_vision_tower_starts_as_the_old_one(tmp_path):
    model = Qwen2VLForConditionalGeneration.from_pretrained(MODEL).eval()
    video = synthetic_camera.make_video(SEEDS[0], frames=32)
    from emloc.adapters.qwen_vl import QwenVLAdapter

    pixels = QwenVLAdapter(model, tiny_tokenizer(WORDS + list(synthetic_camera.WORDS))).preprocess(video.frames)
    grid = torch.tensor([pixels.grid_thw])
    with torch.no_grad():
        before = model.model.visual(pixels.pixel_values, grid_thw=grid).pooler_output
        T.grow_vision(model, 2)
        after = model.model.visual(pixels.pixel_values, grid_thw=grid).pooler_output
    assert len(model.model.visual.blocks) == 4 and model.config.vision_config.depth == 4
    torch.testing.assert_close(after, before)
    model.save_pretrained(tmp_path)
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model.visual(pixels.pixel_values, grid_thw=grid).pooler_output, before)


def test_a_camera_run_with_lookback_and_a_grown_tower_saves_it(tmp_path):
    import json

    out = tmp_path / "model"
    T.main(["--out", str(out), "--task", "camera", "--init", str(DEFAULT_MODEL), "--look",
            "--appearance-targets", "local", "--lookback", "--grow-vision", "1", "--lengths", "32", "--batch", "2",
            "--eval-per-kind", "2", "--eval-at-end", "--warmup", "1", "--threads", "1", "--minutes", "0.0001"])
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["depth"] == 3 and config["emloc_temporal_range"] == 16
    assert json.loads((out / "training.json").read_text())["steps"] == 1


@pytest.mark.parametrize("flag", [["--lookback"], ["--vision-minutes", "1"], ["--lead-cells"]])
def test_camera_only_flags_are_refused_for_other_tasks(tmp_path, flag):
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path / "model"), "--task", "synthetic", *flag])
