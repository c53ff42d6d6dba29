"""Shared fixtures: a private network namespace, a real mosquitto, real clients.

Every test that touches the network runs on loopback only. When the tests run as root on Linux,
this process first moves into a network namespace of its own with only `lo` up, so nothing can
leave 127.0.0.1 whatever a library does; ICE is pointed at 127.0.0.1 with no STUN servers.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rtchat  # noqa: E402

CLONE_NEWNET = 0x40000000


def _enter_private_network() -> str:
    """Move this process (and its children) into a fresh network namespace with only lo."""
    if os.environ.get("RTCHAT_TEST_NETNS") == "0":
        return "shared network namespace (RTCHAT_TEST_NETNS=0); all traffic still aimed at 127.0.0.1"
    if os.environ.get("RTCHAT_IN_PRIVATE_NETNS") == "1":
        return "private network namespace (inherited), lo only"
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("ip"):
        return "shared network namespace (needs root on Linux); all traffic still aimed at 127.0.0.1"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"shared network namespace (unshare failed: {os.strerror(ctypes.get_errno())})"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["RTCHAT_IN_PRIVATE_NETNS"] = "1"
    return "private network namespace, lo only"


NETWORK = _enter_private_network()


def pytest_report_header(config):
    return f"rtchat tests: {NETWORK}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A real mosquitto on free loopback ports: MQTT over TCP and over websockets. stop()/start() for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.tcp_port, self.ws_port = free_port(), free_port()
        self.conf = workdir / "mosquitto.conf"
        ws_extra = "" if NETWORK.startswith("private") else "socket_domain ipv4\n"
        self.conf.write_text(
            f"listener {self.tcp_port} 127.0.0.1\n"
            f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n{ws_extra}"
            "allow_anonymous true\npersistence false\nlog_dest stdout\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/mqtt"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def broker():
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(Path(tmp))
        b.start()
        yield b
        b.stop()


@pytest.fixture
def own_broker(tmp_path):
    """A broker of the test's own, for tests that kill and restart it."""
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


LOOPBACK_ICE = {"ice": [], "ice_hosts": ["127.0.0.1"]}


def make_client(name: str, tmp_path: Path, broker_url: str, **options) -> rtchat.Client:
    """A real client on loopback with its own state file."""
    return rtchat.Client(name, broker=broker_url, state=tmp_path / f"{name}.json", **{**LOOPBACK_ICE, **options})


def run(coro, timeout: float = 60):
    """Run a coroutine to completion on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def cli_env(broker_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_") or k == "RTCHAT_IN_PRIVATE_NETNS"}
    env.update(RTCHAT_BROKER=broker_url, RTCHAT_ICE="none", RTCHAT_ICE_HOST="127.0.0.1", NO_COLOR="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def rtchat_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "rtchat.py"), *args]
