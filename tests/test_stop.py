"""Ctrl-C at any moment stops a command within a few seconds, in one line and without a traceback.

Real processes (`python -m stream ...`) get a real SIGINT or SIGTERM: while their modules load, in
the middle of a fold, and while `serve` serves a stream (a source that sends nothing, a real
mosquitto broker). A command interrupted says `emloc-stream: interrupted` and exits with 130;
`serve` stopped by a signal finishes cleanly (exit 0), saying so in one line, and a second Ctrl-C
stops it at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .broker import Broker, free_port, needs_mosquitto

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN = 5.0  # seconds from the signal to the process's exit
START_WITHIN = 180.0  # seconds a loaded machine may take to reach the moment a test waits for
INTERRUPTED = "emloc-stream: interrupted"


class Command:
    """`python -m stream ARGS` with its output read as it comes."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "stream", *args], cwd=cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(pipe, into), daemon=True)
                        for pipe, into in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, into: list[str]) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = START_WITHIN) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stdout + self.stderr):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"never printed {text!r}: {self.stdout + self.stderr}")
            time.sleep(0.02)

    def stop(self, number: int = signal.SIGINT) -> float:
        """Sends `number`; returns the seconds until the process exited."""
        sent = time.monotonic()
        self.process.send_signal(number)
        try:
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        took = time.monotonic() - sent
        for reader in self.readers:
            reader.join(timeout=5)
        return took


def assert_interrupted(command: Command, took: float) -> None:
    assert command.process.returncode == 130, (command.process.returncode, command.stderr)
    assert command.stderr[-1:] == [INTERRUPTED], command.stderr
    assert not any("Traceback" in line for line in command.stderr), command.stderr
    assert took < STOP_WITHIN, f"stopped {took:.1f} s after the signal"


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_while_the_command_loads(tmp_path, after):
    """0.3 s: Python is importing the command's modules; 1.5 s: torch and transformers, or the model."""
    command = Command("demo", cwd=tmp_path)
    time.sleep(after)
    took = command.stop()
    assert_interrupted(command, took)
    assert command.stderr == [INTERRUPTED], command.stderr  # nothing but the one line


def test_ctrl_c_in_the_middle_of_a_fold(tmp_path):
    command = Command("demo", cwd=tmp_path)
    command.wait_for("video: synthetic seed")  # printed right before the first chunk is folded
    time.sleep(0.3)
    took = command.stop()
    assert_interrupted(command, took)
    assert not any("chunk 3" in line for line in command.stdout), "the demo ran to its end: nothing interrupted"


@pytest.fixture
def site(tmp_path):
    """A config of one stream whose source sends nothing (its reader waits in FFmpeg's open and read
    timeouts), answers over a real mosquitto broker, state saved."""
    broker = Broker(tmp_path).start()
    config = {"mqtt": {"host": "127.0.0.1", "port": broker.port},
              "streams": [{"id": "cam", "source": f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                           "standing": ["what digit is on screen now ?"], "state": str(tmp_path / "state"),
                           "jsonl": str(tmp_path / "answers.jsonl")}]}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    yield path
    broker.stop()


@needs_mosquitto
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_within_seconds(tmp_path, site, number):
    command = Command("serve", "--config", str(site), "--status-every", "0.5", cwd=tmp_path)
    command.wait_for("status cam:")  # serving: the stream started, its broker connected
    time.sleep(1.0)  # the source's reader is inside FFmpeg's open timeout now
    took = command.stop(number)
    assert command.process.returncode == 0, command.stderr
    assert took < STOP_WITHIN, f"stopped {took:.1f} s after the signal"
    assert not any("Traceback" in line for line in command.stderr), command.stderr
    assert sum(line.startswith("emloc-stream: stopping") for line in command.stderr) == 1, command.stderr
    assert "stopped cam: 0 frames, 0 chunks, 0 answers" in command.stdout, command.stdout


@needs_mosquitto
def test_serve_interrupted_while_the_model_loads(tmp_path, site):
    command = Command("serve", "--config", str(site), cwd=tmp_path)
    time.sleep(1.5)
    took = command.stop(signal.SIGTERM)
    assert_interrupted(command, took)


@needs_mosquitto
def test_a_second_ctrl_c_stops_serve_at_once(tmp_path, site):
    command = Command("serve", "--config", str(site), "--status-every", "0.5", cwd=tmp_path)
    command.wait_for("status cam:")
    command.process.send_signal(signal.SIGINT)
    command.wait_for("emloc-stream: stopping", timeout=STOP_WITHIN)  # closing: the source's reader is waited for
    took = command.stop()
    assert_interrupted(command, took)
    assert not any(line.startswith("stopped cam") for line in command.stdout), command.stdout
