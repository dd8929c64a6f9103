"""A real mosquitto broker on a free local port, and a plain paho client to talk to it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt install mosquitto)")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Persistence on, so a restart keeps subscriptions and queued QoS 1 messages, as in production.
    `user root` keeps a broker started by root from dropping to a user that cannot write the test's folder
    (it has no effect for other users)."""

    def __init__(self, folder: Path, extra: str = "", anonymous: bool = True) -> None:
        self.port = free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\n"
                               f"persistence true\nuser root\npersistence_location {folder}/\nautosave_interval 1\n"
                               + extra)
        self.process = None

    def start(self) -> Broker:
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        """SIGKILL: no chance to save; only what persistence wrote already survives."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # saves the persistence database
            self.process.wait(timeout=10)


class Client:
    """Collects every message on the subscribed topics; survives broker restarts (persistent session)."""

    def __init__(self, port: int, topics: list[str], name: str = "test-client") -> None:
        import paho.mqtt.client as mqtt

        self.messages: dict[str, list] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.subscribed = threading.Event()  # the broker acknowledged the subscriptions (set again after a restart)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            try:
                data = json.loads(message.payload)
            except ValueError:
                data = message.payload
            self.messages.setdefault(message.topic, []).append(data)

    def publish(self, topic: str, payload, qos: int = 1) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        deadline = time.time() + 15
        while not self.client.is_connected() and time.time() < deadline:  # after a broker restart
            time.sleep(0.05)
        self.client.publish(topic, data, qos=qos).wait_for_publish(10)

    def got(self, topic: str) -> list:
        with self.lock:
            return list(self.messages.get(topic, []))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
