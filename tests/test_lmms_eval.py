"""`lmms-eval --model emloc_stream` on a small local video task built here from synthetic videos, answered by the
shipped model through our one video path, each answer scored against the video's ground truth.

lmms-eval is heavy (wandb, datasets, opencv, sentence-transformers, and av<16, older than ours), so it is an extra
of its own (`pip install -e ".[lmms-eval]"`) that CI does not install: without it this module is skipped, saying so.
The task is a plain lmms-eval task folder (YAML + utils.py, `--include_path`) over a JSON Lines file of
{video, question, answer}: four fresh seeds of 96 frames, the four question types each (16 questions). Thresholds
as in test_end_to_end: 50% for the online setting (the video folded before its question is known), 75% when the
questions guide the pruning; chance is about 25%.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream.models import DEFAULT_MODEL
from stream.sources import write_video
from stream.suites.synthetic import QUESTION_TYPES, make_video

needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not "
                                     "installed (pip install -e '.[lmms-eval]'; heavy, so CI does not install it)")

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(9_500_001, 9_500_005)
TASK_YAML = """task: emloc_synthetic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms")
    (folder / "task").mkdir()
    docs = []
    for seed in SEEDS:
        video = make_video(seed, frames=96)
        path = write_video(folder / f"s{seed}.mp4", video.frames, video.fps)
        docs += [{"video": str(path), "kind": k, "question": video.question(k).text,
                  "answer": video.question(k).answer} for k in QUESTION_TYPES]
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "task" / "emloc_synthetic.yaml").write_text(TASK_YAML.format(docs=folder / "docs.jsonl"))
    (folder / "task" / "utils.py").write_text(TASK_UTILS)
    return folder


def evaluate(task: Path, name: str, model_args: str) -> list[dict]:
    out = task / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(task / "datasets"), "HF_HOME": str(task / "hf"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "emloc_stream", "--model_args",
                             f"pretrained={DEFAULT_MODEL},{model_args}".rstrip(","),
                             "--tasks", "emloc_synthetic", "--include_path", str(task / "task"), "--batch_size", "1",
                             "--output_path", str(out), "--log_samples"], capture_output=True, text=True, env=env,
                            cwd=task, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "Error during evaluation" not in log, log[-4000:]  # it exits 0 on errors
    samples = [json.loads(line) for path in out.rglob("*samples_emloc_synthetic*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(SEEDS) * len(QUESTION_TYPES), (log[-2000:], list(out.rglob("*")))
    return samples


def test_the_plugin_is_declared_and_its_imports_of_ours_resolve():
    """Without lmms-eval the plug-in cannot be imported; what it takes from this project is checked here (so
    a rename elsewhere fails in CI, not at a user's first lmms-eval run), and the entry point lmms-eval reads."""
    section = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."lmms_eval.models"]')[1]
    entry = re.search(r'^emloc_stream = "([^"]+)"', section.split("\n[")[0], re.M)[1]  # (tomllib: Python 3.11+)
    module, _, attribute = entry.partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == attribute for node in tree.body)
    package = module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("lmms_eval"):
            imported = importlib.import_module(("." * node.level) + (node.module or ""), package if node.level
                                               else None)
            for alias in node.names:
                assert hasattr(imported, alias.name), f"{path.name}: {node.module}.{alias.name} is gone"


@needs_lmms_eval
@pytest.mark.parametrize("setting, model_args, threshold", [
    ("online", "", 0.50),  # the product default: group-wise (half the layers a group), question unknown
    ("query-aware", "query_aware=true,preset=videomme_online,layer_group_size=2", 0.75),
])
def test_lmms_eval_runs_a_video_task_through_our_pipeline(task, setting, model_args, threshold):
    samples = evaluate(task, setting, model_args)
    docs = [json.loads(line) for line in (task / "docs.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    right = []
    for sample in samples:
        doc = docs[sample["doc_id"]]
        assert (sample["input"], sample["target"]) == (doc["question"], doc["answer"])
        right.append(_response(sample) == doc["answer"])
        assert sample["exact_match"] == float(right[-1]), "the task scored what we score"
    accuracy = sum(right) / len(right)
    print(f"\nlmms-eval, {setting}: {sum(right)}/{len(right)} = {100 * accuracy:.0f}% "
          f"(threshold {100 * threshold:.0f}%)")
    assert accuracy >= threshold, [(s["input"], s["filtered_resps"], s["target"]) for s in samples]


def _response(sample: dict) -> str:
    response = sample["filtered_resps"]
    while isinstance(response, list):
        response = response[0]
    return response.strip()


@needs_lmms_eval
def test_bad_model_arguments_are_named_before_the_model_loads(monkeypatch):
    import stream.lmms_eval_model as plugin
    from emloc.settings import SettingsError
    from stream.config import ConfigError

    monkeypatch.setattr(plugin, "build_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SettingsError, match="unknown EMLoC setting"):
        plugin.EmlocStream(colour=3)
    with pytest.raises(ConfigError, match="query_aware must be true or false"):
        plugin.EmlocStream(query_aware="yes")
    with pytest.raises(ConfigError, match="max_new_tokens must be a positive integer"):
        plugin.EmlocStream(max_new_tokens=0)
