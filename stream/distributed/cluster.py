"""Joining the cluster and saying where an actor runs."""

from __future__ import annotations

import os

import ray


def connect(address: str) -> dict:
    """Connects this process as the driver; returns the cluster's total resources."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    except ConnectionError as error:  # no cluster at that address
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {error}") from error
    return ray.cluster_resources()


def placement() -> dict:
    """Inside an actor: the node it runs on (id and address) and its process."""
    context = ray.get_runtime_context()
    return dict(node_id=context.get_node_id(), node_ip=ray.util.get_node_ip_address(), pid=os.getpid())


def node_label(where: dict) -> str:
    return f"node {where['node_id'][:8]} ({where['node_ip']}), pid {where['pid']}"


def actor_options(args, **extra) -> dict:
    return dict(num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker, resources=dict(args.resources), **extra)
