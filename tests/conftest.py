"""Shared fixtures: a private network namespace, a real mosquitto, real clients.

Every test that touches the network runs on loopback only. When the tests run as root on Linux,
this process first moves into a network namespace of its own with only `lo` up, so nothing can
leave 127.0.0.1 whatever a library does; ICE is pointed at 127.0.0.1 with no STUN servers.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


# -- PeerJS: a real PeerServer (npm `peer`, installed by .ci/run) ------------------------------------------

PEERJS_SERVER_SCRIPT = ROOT / "tests" / "peerjs_server.cjs"


def peerjs_node_modules() -> Path | None:
    """Where npm `peer` is: $RTCHAT_PEERJS_SERVER_DIR (what .ci/run fills), ~/.cache/rtchat-ci/peer, or the
    browser harness's $PJS_NODE_MODULES."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtchat-ci" / "peer"
    candidates = [Path(os.environ["RTCHAT_PEERJS_SERVER_DIR"]) / "node_modules"] \
        if os.environ.get("RTCHAT_PEERJS_SERVER_DIR") else [cache / "node_modules"]
    if os.environ.get("PJS_NODE_MODULES"):
        candidates.append(Path(os.environ["PJS_NODE_MODULES"]))
    return next((c for c in candidates if (c / "peer" / "package.json").is_file()), None)


def missing_peerjs_server() -> str | None:
    if not shutil.which("node"):
        return "node is not installed (apt-get install nodejs npm); .ci/run installs it"
    if peerjs_node_modules() is None:
        return "npm `peer` not found (npm install --prefix ~/.cache/rtchat-ci/peer peer@1.0.2); .ci/run installs it"
    return None


class PeerServer:
    """A real PeerJS server (npm `peer`) on 127.0.0.1. events: what its clients did, one dict each."""

    def __init__(self, **options) -> None:
        self.options = options
        self.events: list[dict] = []
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> PeerServer:
        env = dict(os.environ, NODE_PATH=str(peerjs_node_modules()))
        self.proc = subprocess.Popen(["node", str(PEERJS_SERVER_SCRIPT), json.dumps(self.options)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        first = self.proc.stdout.readline()
        try:
            self.port = json.loads(first)["port"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise RuntimeError(f"the PeerJS server did not start: {first}{self.proc.stdout.read()[-2000:]}") \
                from None
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def url(self, key: str | None = None) -> str:
        path = self.options.get("path", "/").strip("/")
        return f"ws://127.0.0.1:{self.port}/{path + '/' if path else ''}" + (f"?key={key}" if key else "")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _start_peerserver(**options) -> PeerServer:
    reason = missing_peerjs_server()
    if reason:
        if os.environ.get("RTCHAT_REQUIRE_PEERJS") == "1":
            pytest.fail(f"PeerJS server needed (RTCHAT_REQUIRE_PEERJS=1): {reason}")
        print(f"PeerJS tests skipped: {reason}")
        pytest.skip(f"PeerJS server: {reason}")
    return PeerServer(**options).start()


@pytest.fixture(scope="session")
def peerserver():
    """One PeerServer for the session: key "peerjs", path "/", EXPIRE after 5 s, as the page's cloud."""
    server = _start_peerserver()
    yield server
    server.stop()


@pytest.fixture
def own_peerserver():
    """PeerServers with options of the test's own: own_peerserver(key=..., path=..., expire_timeout=ms)."""
    servers: list[PeerServer] = []

    def start(**options) -> PeerServer:
        servers.append(_start_peerserver(**options))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()
