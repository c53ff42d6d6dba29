"""Shared fixtures: a private network namespace, a real mosquitto, real clients (the helpers are in support.py).

Every test that touches the network runs on loopback only. When the tests run as root on Linux,
this process first moves into a network namespace of its own with only `lo` up, so nothing can
leave 127.0.0.1 whatever a library does; ICE is pointed at 127.0.0.1 with no STUN servers.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from support import (  # noqa: F401  (tests import these from here)
    ROOT,
    Broker,
    Federation,
    cli_env,
    enter_private_network,
    eventually,
    make_client,
    make_pathless,
    mosquitto_binary,
    rtchat_cmd,
    run,
)

sys.path.insert(0, str(ROOT))

NETWORK = enter_private_network()


def pytest_report_header(config):
    return f"rtchat tests: {NETWORK}"


@pytest.fixture(scope="session")
def broker():
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(Path(tmp)).start()
        yield b
        b.stop()


@pytest.fixture
def own_broker(tmp_path):
    """A broker of the test's own, for tests that kill and restart it."""
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def federation(tmp_path):
    """federation(n, cuttable=False, delay=0, options=""): n real mosquittos on loopback, each bridged to the one
    before by the README's mosquitto.conf snippet (and options), returned once a probe published on each has reached
    all (support.Federation)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    made: list[Federation] = []

    def start(count: int = 2, cuttable: bool = False, delay: float = 0.0, options: str = "") -> Federation:
        made.append(Federation(tmp_path / f"federation{len(made)}", count, cuttable, delay, options))
        return made[-1]
    yield start
    for federated in made:
        federated.stop()


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


# -- pathless pairs on loopback (relaying through members) ---------------------------------------------------

@pytest.fixture
def pathless(monkeypatch):
    """pathless.add("alice", "bob"): the offers and answers between these two carry only candidates nobody
    listens on, so they reach each other by signaling but find no network path (see support.make_pathless);
    pathless.remove gives them their path back for the next try."""
    import rtchat
    monkeypatch.setattr(rtchat, "NO_PATH_AFTER_S", 1.0)
    monkeypatch.setattr(rtchat, "RETRY_AFTER_S", 600.0)
    pairs: set[frozenset] = set()
    monkeypatch.setattr(rtchat.RoomSignaling, "publish", make_pathless(rtchat.RoomSignaling.publish, pairs))

    class Pairs:
        @staticmethod
        def add(a: str, b: str) -> None:
            pairs.add(frozenset((a, b)))

        @staticmethod
        def remove(a: str, b: str) -> None:
            pairs.discard(frozenset((a, b)))
    return Pairs
