"""One settings source: the CLI without a config, configs/default.yaml, `EMLoCSettings()` and the serve
paths (HTTP, MQTT) fold with the same settings and answer with the same max_new_tokens, on the shipped
model (4 layers) and on a model of another depth; the layer grouping is decided once, by `for_model`."""

import inspect
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from emloc import EMLoCSettings, SettingsError, StreamContext
from emloc.settings import MAX_NEW_TOKENS, videomme_online
from stream.cli import build_parser
from stream.commands.common import config_from
from stream.config import Config, ConfigError, load_config
from stream.engine import build_model, describe
from stream.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT / "configs" / "default.yaml"


def old_rule(layers: int) -> int:
    """What the CLI ran without a config before there was one source: half the layers, else layer-wise."""
    return layers // 2 if layers % 2 == 0 else 1


@pytest.fixture(scope="module", params=["shipped", "six layers"])
def checkpoint(request, tmp_path_factory):
    """A checkpoint folder and its depth: the shipped model, and a saved tiny Qwen2-VL of 6 layers."""
    if request.param == "shipped":
        return str(DEFAULT_MODEL), 4
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer

    folder = tmp_path_factory.mktemp("six")
    tokenizer = tiny_tokenizer()
    tiny_qwen2_vl(tokenizer, layers=6, init_std=0.1, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder), 6


def site_config(tmp_path: Path) -> Path:
    """A serve config with an MQTT broker and a stream, and no emloc: section (the MQTT path's default)."""
    path = tmp_path / "site.yaml"
    path.write_text("mqtt:\n  host: 127.0.0.1\n  port: 1883\nstreams:\n  - id: gate\n    source: udp://127.0.0.1:5000\n")
    return path


@pytest.mark.slow  # loads the model once per path
def test_every_path_folds_with_the_same_settings(checkpoint, tmp_path):
    path, layers = checkpoint
    argvs = {
        "run": ["run", "clip.mp4", "--ask", "what ?"],
        "demo": ["demo"],
        "batch": ["batch", str(tmp_path), "--out", str(tmp_path / "a.jsonl")],
        "live": ["live", "udp://127.0.0.1:5000"],
        "serve --http": ["serve", "--http", "127.0.0.1:8080"],
        "serve --config (MQTT)": ["serve", "--config", str(site_config(tmp_path))],
    }
    resolved = {}
    for name, argv in argvs.items():
        args = build_parser().parse_args([*argv, "--model", path])
        config = config_from(args)
        adapter, resolved[name], _ = build_model(config, args.model)
    adapter, resolved["configs/default.yaml"], _ = build_model(load_config(DEFAULT_FILE), path)
    resolved["EMLoCSettings()"] = EMLoCSettings().for_model(adapter.num_layers, adapter.temporal_patch)
    resolved["StreamContext without settings"] = StreamContext(adapter).settings
    assert adapter.num_layers == layers
    for name, settings in resolved.items():
        assert settings == resolved["EMLoCSettings()"], name
    assert resolved["EMLoCSettings()"].layer_group_size == old_rule(layers) == layers // 2
    # the default is the query-agnostic one (docs/benchmarks/agnostic.md), whatever the depth
    assert resolved["run"] == EMLoCSettings(layer_group_size=layers // 2, delta=0.04, chunk_frames=64,
                                            ratios=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), scorer="tar+keydiff",
                                            probe_answer_tokens=16, merge_dropped=True)


def test_the_default_file_is_what_runs_without_a_config():
    assert load_config(DEFAULT_FILE) == Config()
    assert load_config(DEFAULT_FILE).emloc == EMLoCSettings()
    assert Config().model.max_new_tokens == MAX_NEW_TOKENS == 16


@pytest.mark.slow  # serve in a subprocess
def test_serve_prints_the_default_settings(tmp_path):
    """The HTTP path for real: `serve --http` without a config folds with the default resolved on the
    shipped model (its start-up line names the settings)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "stream", "serve", "--http", f"127.0.0.1:{port}", "--duration",
                             "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = describe(EMLoCSettings().for_model(4, 2))
    assert f"4 layers; {expected}" in result.stdout, result.stdout
    assert "layer groups of 2," in expected


def test_one_max_new_tokens_default(tmp_path):
    """Every command's --max-new-tokens comes from the config (16 by default), and every function
    that answers defaults to the same MAX_NEW_TOKENS."""
    argvs = [["run", "clip.mp4"], ["demo"], ["batch", str(tmp_path), "--out", "a.jsonl"], ["live", "udp://x:1"],
             ["serve", "--http", "127.0.0.1:8080"]]
    for argv in argvs:
        args = build_parser().parse_args(argv)
        assert args.max_new_tokens is None, argv  # the config fills it in
        config = config_from(args)
        assert args.max_new_tokens == config.model.max_new_tokens == MAX_NEW_TOKENS, argv
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  max_new_tokens: 5\n")
    for argv in argvs:
        args = build_parser().parse_args([*argv, "--config", str(own)])
        assert config_from(args).model.max_new_tokens == args.max_new_tokens == 5, argv
        args = build_parser().parse_args([*argv, "--config", str(own), "--max-new-tokens", "7"])
        assert config_from(args).model.max_new_tokens == args.max_new_tokens == 7, argv

    from stream.job import VideoJob, answer_video
    from stream.runtime import StreamRunner
    from stream.service import LiveStream

    for function in (StreamContext.answer, StreamRunner, LiveStream, answer_video, VideoJob.answer):
        default = inspect.signature(function).parameters["max_new_tokens"].default
        assert default == MAX_NEW_TOKENS, function


def test_bad_max_new_tokens_is_named(tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--max-new-tokens", "0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  max_new_tokens: 0\n")
    with pytest.raises(ConfigError, match="model.max_new_tokens must be an integer >= 1, got 0"):
        load_config(bad)


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6, 7, 8, 12, 24, 28, 36, 80])
def test_layer_groups_follow_the_depth(layers):
    assert EMLoCSettings().for_model(layers, 2).layer_group_size == old_rule(layers)
    if layers % 4 == 0:
        assert EMLoCSettings(layer_groups=4).for_model(layers, 2).layer_group_size == layers // 4


def test_an_explicit_group_size_wins_and_is_checked():
    assert videomme_online().for_model(28, 2).layer_group_size == 14  # the paper's presets keep their sizes
    with pytest.raises(SettingsError, match="layer_group_size=14 does not divide the model's 4 decoder layers"):
        videomme_online().for_model(4, 2)
    assert videomme_online(layer_groups=2).for_model(4, 2).layer_group_size == 2  # relative to the depth
    assert EMLoCSettings(layer_group_size=7, layer_groups=2).for_model(28, 2).layer_group_size == 7
    resolved = EMLoCSettings().for_model(28, 2)
    assert resolved.for_model(28, 2) is resolved  # deciding twice decides nothing new
    with pytest.raises(SettingsError, match="layer_groups must be an integer >= 1"):
        EMLoCSettings(layer_groups=0)


def test_settings_saved_before_layer_groups_still_match():
    """States and task packs saved before `layer_groups` existed hold an explicit group size and no
    layer_groups: read back, they equal the default resolved on the same model, so they resume."""
    saved = EMLoCSettings().for_model(4, 2).to_dict()
    del saved["layer_groups"]
    assert EMLoCSettings.from_dict(saved) == EMLoCSettings().for_model(4, 2)


def test_config_layer_groups(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("emloc:\n  preset: videomme_online\n  layer_groups: 2\n")
    assert load_config(path).emloc.for_model(4, 2).layer_group_size == 2
    path.write_text("emloc:\n  layer_groups: 4\n")
    assert load_config(path).emloc.for_model(28, 2).layer_group_size == 7


def test_live_flags_default_to_a_config_stream():
    """live's flags that a config's stream also holds are None unless given, so the stream gets
    StreamConfig's defaults, as a stream of a config does; --help shows those defaults."""
    from stream.commands.live import STREAM_FLAGS
    from stream.config import StreamConfig

    args = build_parser().parse_args(["live", "udp://127.0.0.1:5000"])
    assert all(getattr(args, name) is None for name in STREAM_FLAGS)
    assert set(STREAM_FLAGS) <= {f for f in StreamConfig.__dataclass_fields__}
    shown = subprocess.run([sys.executable, "-m", "stream", "live", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                                      "PYTHONPATH": str(ROOT)}).stdout
    assert f"older ones drop (default {StreamConfig.buffer})" in shown
    assert f"more are refused (default {StreamConfig.max_waiting})" in shown
