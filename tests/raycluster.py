"""A real local Ray cluster for tests and benchmarks: each node is its own `ray start --block` session.

Every node lives in its own process session, so a node can be killed outright (SIGKILL to the
whole session: raylet, object store, its workers), as when a machine dies; and `stop` ends
exactly the processes this cluster started (by session, then any left with this cluster's
private temp dir on their command line), never another session's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
# A dead node is declared dead after about period x threshold (Ray's defaults: 3 s x 5, plus timeouts).
HEALTH_CHECK = dict(RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="1000",
                    RAY_health_check_timeout_ms="2000", RAY_health_check_failure_threshold="3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, process: subprocess.Popen, log: Path, resources: dict) -> None:
        self.process, self.log, self.resources = process, log, resources
        self.node_id: str | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """The machine dies: every process of this node at once, its Ray workers included (each has a
        process group of its own but stays in the node's session). All are frozen first, so that none
        acts on another's death before it dies too."""
        doomed = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _sid(int(p.name)) ==
                  self.process.pid]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in doomed:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.process.wait(timeout=30)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class Cluster:
    def __init__(self, prefix: str = "r13") -> None:
        self.temp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths must fit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        **HEALTH_CHECK)

    def _start(self, args: list[str], cpus: float, resources: dict) -> Node:
        log = self.temp / f"node{len(self.nodes)}.log"
        process = subprocess.Popen([RAY, "start", "--block", f"--num-cpus={cpus:g}", "--num-gpus=0",
                                    f"--resources={json.dumps(resources)}", "--object-store-memory=80000000",
                                    "--disable-usage-stats", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   env=self.env, start_new_session=True)
        node = Node(process, log, resources)
        known = {n.node_id for n in self.nodes}
        self.nodes.append(node)
        node.node_id = self.wait_nodes(lambda alive: [n["id"] for n in alive if n["id"] not in known])[0]
        return node

    def start_head(self, cpus: float = 1, resources: dict | None = None) -> Node:
        return self._start(["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                            f"--dashboard-port={free_port()}", "--node-ip-address=127.0.0.1"], cpus, resources or {})

    def add_node(self, cpus: float = 1, resources: dict | None = None) -> Node:
        return self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], cpus, resources or {})

    def wait_nodes(self, condition, timeout: float = 90.0):
        """Waits until `condition(alive nodes)` (each a dict of id, resources) is truthy; returns it."""
        script = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                  "print('NODES', json.dumps([dict(id=n['NodeID'], alive=n['Alive'], resources=n['Resources']) "
                  "for n in ray.nodes()]))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in self.nodes:
                if not node.alive and node.node_id is None:
                    raise RuntimeError(f"a Ray node exited: {node.log.read_text()[-2000:]}")
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=self.env,
                                 timeout=60)
            if out.returncode == 0:
                line = next(x for x in out.stdout.splitlines() if x.startswith("NODES "))
                alive = [n for n in json.loads(line[6:]) if n["alive"]]
                if found := condition(alive):
                    return found
            time.sleep(0.5)
        raise TimeoutError(f"the Ray node did not come up in {timeout} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        for pid in self._stragglers():  # anything of ours that left its process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def _stragglers(self) -> list[int]:
        mine = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(self.temp).encode() in (entry / "cmdline").read_bytes():
                        mine.append(int(entry.name))
                except OSError:
                    continue
        return mine

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
