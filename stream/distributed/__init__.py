"""`batch --ray` and `serve --ray`: the same work spread over a Ray cluster.

Nothing here imports Ray until a command is given `--ray`: `options` only adds the flags.
Every node must have emloc-stream installed (the same version) and see the videos, the model
folder and `--state-dir` at the same paths (shared storage).
"""

from __future__ import annotations

import argparse
import json


def resources(text: str) -> dict:
    """--resources: a JSON object of custom Ray resources, each a number >= 0."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                             and not isinstance(v, bool) and v >= 0 for k, v in data.items()):
        raise argparse.ArgumentTypeError('a JSON object of resource names and amounts >= 0, e.g. {"camera_node": 1}')
    return data


def share(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def options(p: argparse.ArgumentParser, worker: str) -> None:
    """The flags that put a command on a Ray cluster; `worker` names what runs as one actor."""
    g = p.add_argument_group("Ray cluster (pip install 'emloc-stream[ray]')")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run on a Ray cluster: its address (HOST:PORT or ray://...); alone: the running cluster")
    g.add_argument("--gpus-per-worker", type=share, default=0.0, help=f"GPUs each {worker} holds, e.g. 0.5")
    g.add_argument("--cpus-per-worker", type=share, default=1.0, help=f"CPUs each {worker} holds")
    g.add_argument("--resources", type=resources, default={},
                   help=f'custom Ray resources each {worker} needs, JSON, e.g. \'{{"camera_node": 1}}\'')
