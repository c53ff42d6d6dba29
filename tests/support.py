"""What the tests and the benchmark share: a private network namespace, a real mosquitto, loopback-only ICE, an MQTT
sniffer, and rtchat.py subprocesses whose output can be waited on.

Nothing here imports rtchat or pytest at import time: bench/run.py measures a snapshot of rtchat.py of its own, and
its worker processes import this module too.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000


def enter_private_network() -> str:
    """Move this process (and so every child) into a fresh network namespace with only lo up; say where it is.

    As root on Linux only; RTCHAT_TEST_NETNS=0 keeps the shared namespace. Children inherit the namespace and
    RTCHAT_IN_PRIVATE_NETNS=1, so a test or bench run inside one does not unshare again."""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return found if Path(found).exists() else None


class Broker:
    """A real mosquitto on free loopback ports: MQTT over TCP and over websockets. stop()/start() for fault tests.
    `extra`: more mosquitto.conf lines (a bridge's, say) after ours."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        self.tcp_port, self.ws_port = free_port(), free_port()
        self.conf = workdir / "mosquitto.conf"
        ws_extra = "" if os.environ.get("RTCHAT_IN_PRIVATE_NETNS") == "1" else "socket_domain ipv4\n"
        self.conf.write_text(
            f"listener {self.tcp_port} 127.0.0.1\n"
            f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n{ws_extra}"
            "allow_anonymous true\npersistence false\nlog_dest stdout\n" + extra)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/mqtt"

    def start(self) -> Broker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary() or "mosquitto", "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# Loopback-only ICE: no STUN/TURN server, and 127.0.0.1 as the only host address (aioice never offers it alone).
LOOPBACK_ICE = {"ice": [], "ice_hosts": ["127.0.0.1"]}             # rtchat.Client(..., **LOOPBACK_ICE)
LOOPBACK_ICE_ARGS = ("--ice", "none", "--ice-host", "127.0.0.1")    # the same on rtchat.py's command line
LOOPBACK_ICE_ENV = {"RTCHAT_ICE": "none", "RTCHAT_ICE_HOST": "127.0.0.1"}  # and in its environment


class LossyLink:
    """A TCP proxy in front of the broker, for one client, that loses MQTT PUBLISH packets (QoS 0, as rtchat.py
    and browsers publish and subscribe, so neither end notices): each one, either way, with probability drop
    (1.0: the client hears nothing and is heard by nobody, while its connection to the broker stays up). Runs on
    the caller's event loop; drop may change at any time."""

    PUBLISH = 3

    def __init__(self, broker_port: int, drop: float = 0.0, seed: int = 0) -> None:
        self.broker_port = broker_port
        self.drop = drop
        self.dropped = 0
        self._random = random.Random(seed)
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> LossyLink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            client_writer.close()
            return
        self._writers += [client_writer, broker_writer]
        await asyncio.gather(self._pump(client_reader, broker_writer), self._pump(broker_reader, client_writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Packet by packet (fixed header, remaining length as a varint, body); a PUBLISH may be left out."""
        try:
            while True:
                header = await reader.readexactly(1)
                length, shift, raw = 0, 0, b""
                while True:
                    byte = await reader.readexactly(1)
                    raw += byte
                    length |= (byte[0] & 0x7F) << shift
                    shift += 7
                    if not byte[0] & 0x80:
                        break
                body = await reader.readexactly(length)
                if header[0] >> 4 == self.PUBLISH and self._random.random() < self.drop:
                    self.dropped += 1
                    continue
                writer.write(header + raw + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


def offer_only_loopback() -> None:
    """For plain aiortc peers (not rtchat's, which have ice_hosts): offer exactly 127.0.0.1."""
    import aioice.ice
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


NOWHERE = 9   # the discard port: nothing listens there on loopback


def make_pathless(publish, pairs: set[frozenset]):
    """RoomSignaling.publish, except that offers and answers between two bare names in pairs carry only
    candidates nobody listens on: the two reach each other by signaling but find no network path, as two
    symmetric NATs without TURN (relaying through members is then what joins them)."""
    import rtchat

    def pathless(self, subtopic, data, to=None, compact=False, topic=None):
        if subtopic in ("RTCOffer", "RTCAnswer") and \
                frozenset((rtchat.bare_name(self.me), rtchat.bare_name(to or ""))) in pairs:
            holder = data["offer"] if subtopic == "RTCOffer" else data
            sdp = re.sub(r"(a=candidate:\S+ \d+ \w+ \d+ \S+ )(\d+)", lambda m: f"{m[1]}{NOWHERE}",
                         holder["localDescription"]["sdp"])
            holder["localDescription"] = {**holder["localDescription"], "sdp": sdp}
        return publish(self, subtopic, data, to=to, compact=compact, topic=topic)
    return pathless


def make_client(name: str, tmp_path: Path, broker_url: str, **options):
    """A real rtchat Client on loopback with its own state file."""
    import rtchat
    return rtchat.Client(name, broker=broker_url, state=tmp_path / f"{name}.json", **{**LOOPBACK_ICE, **options})


class Sniffer:
    """A paho client of its own on the broker that records every payload published on the topics, with the
    time.monotonic() it arrived (comparable across processes on Linux)."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("mrtchat/#",)) -> None:
        import paho.mqtt.client as mqtt
        self.records: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        tag = "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sniffer-{tag}")
        self.client.on_connect = lambda c, *a: c.subscribe([(topic, 0) for topic in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self._add(m.topic, m.payload)
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the sniffer could not subscribe")

    def _add(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.records.append((time.monotonic(), topic, payload))

    def window(self, topic_prefix: str, t0: float, t1: float) -> list[tuple[float, str, bytes]]:
        """What came on topics starting with topic_prefix between t0 and t1."""
        with self.lock:
            return [r for r in self.records if r[1].startswith(topic_prefix) and t0 <= r[0] <= t1]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- brokers joined by bridges (README: "Large deployments") ------------------------------------------------

def readme_bridge(port: int, name: str) -> str:
    """The README's mosquitto.conf bridge snippet as written, only aimed at 127.0.0.1:port and named `name`."""
    found = re.search(r"^```conf\n(# mosquitto\.conf of broker B.*?)^```", (ROOT / "README.md").read_text(),
                      re.MULTILINE | re.DOTALL)
    if not found or "address broker-a.example.org:1883\n" not in found.group(1) \
            or "connection rtchat-b\n" not in found.group(1):
        raise RuntimeError("README.md has lost its mosquitto bridge snippet (connection rtchat-b, broker-a...)")
    return found.group(1).replace("broker-a.example.org:1883", f"127.0.0.1:{port}") \
        .replace("connection rtchat-b\n", f"connection {name}\n")


class TcpRelay:
    """A TCP relay on loopback to a port, that can be cut (its connections closed, new ones refused) and mended:
    a link between two brokers that fails while nothing else does. delay: seconds each byte takes, each way (a
    link between distant brokers)."""

    def __init__(self, target: int, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.is_open = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return  # stopped
            try:
                if not self.is_open:
                    raise OSError("cut")
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                near.close()
                continue
            with self._lock:
                self._sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                chunks: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(source, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(chunks, sink), daemon=True).start()

    @staticmethod
    def _read(source: socket.socket, chunks: queue.Queue) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                chunks.put((time.monotonic(), data))
        chunks.put((time.monotonic(), b""))

    def _write(self, chunks: queue.Queue, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                came, data = chunks.get()
                time.sleep(max(0.0, came + self.delay - time.monotonic()))
                if not data:
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.is_open = False
        with self._lock:
            ends, self._sockets = self._sockets, []
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def mend(self) -> None:
        self.is_open = True

    def stop(self) -> None:
        self.cut()
        self.server.close()


PROBE_TOPIC = "mrtchat/-probe"  # under the bridged topics; no rtchat.py peer subscribes to it


class Federation:
    """count mosquitto brokers in a chain, each bridged to the one before by the README's snippet, with a Sniffer
    on each to tell what every broker carried. cuttable: each bridge runs through a TcpRelay (cut() and mend()
    them), and is tried again every second when it fails (mosquitto backs off from 5 s to 30 s by default).
    delay: each bridge runs through a TcpRelay that takes this long each way. options: more lines for each bridge."""

    def __init__(self, workdir: Path, count: int, cuttable: bool = False, delay: float = 0.0,
                 options: str = "") -> None:
        self.brokers: list[Broker] = []
        self.sniffers: list[Sniffer] = []
        self.relays: list[TcpRelay] = []
        self._probes = 0
        try:
            for n in range(count):
                (workdir / f"broker{n}").mkdir(parents=True)
                bridge = ""
                if self.brokers:
                    port = self.brokers[-1].tcp_port
                    if cuttable or delay:
                        self.relays.append(TcpRelay(port, delay))
                        port = self.relays[-1].port
                    bridge = readme_bridge(port, f"rtchat-{n}") + options + ("restart_timeout 1\n" if cuttable else "")
                self.brokers.append(Broker(workdir / f"broker{n}", bridge).start())
                self.sniffers.append(Sniffer(self.brokers[-1].tcp_port))
            self.wait_joined()
        except BaseException:
            self.stop()
            raise

    def wait_joined(self) -> None:
        """Until a probe published on each broker has reached every broker."""
        for sniffer in self.sniffers:
            self._probe_from(sniffer)

    def cut(self) -> None:
        for relay in self.relays:
            relay.cut()

    def mend(self) -> None:
        """The bridges may connect again; returns once they have."""
        for relay in self.relays:
            relay.mend()
        self.wait_joined()

    def _probe_from(self, sniffer: Sniffer, timeout: float = 30.0) -> None:
        """Until a probe published on sniffer's broker has reached every broker (a bridge connects a moment after
        its broker starts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._probes += 1
            probe = f"probe {self._probes}".encode()
            sniffer.client.publish(PROBE_TOPIC, probe, qos=0)
            arrived = time.monotonic() + 0.3
            while time.monotonic() < arrived:
                if all(any(r[2] == probe for r in other.window(PROBE_TOPIC, 0.0, math.inf)) for other in self.sniffers):
                    return
                time.sleep(0.02)
        raise RuntimeError(f"the bridges did not carry a probe within {timeout:g} s: "
                           f"{[b.log.read_text()[-600:] for b in self.brokers]}")

    def carried(self, broker: int) -> list[bytes]:
        """What a broker carried on rtchat.py's topics (not our probes, which go before the bridges are up)."""
        with self.sniffers[broker].lock:
            return [payload for _, topic, payload in self.sniffers[broker].records if topic != PROBE_TOPIC]

    def carried_topics(self, broker: int) -> set[str]:
        with self.sniffers[broker].lock:
            return {topic for _, topic, _ in self.sniffers[broker].records if topic != PROBE_TOPIC}

    def duplicates(self) -> list[tuple[int, int]]:
        """(broker, copies) for each payload a broker carried more than once (rtchat.py never repeats one)."""
        return [(n, copies) for n in range(len(self.brokers))
                for copies in Counter(self.carried(n)).values() if copies > 1]

    def not_everywhere(self, timeout: float = 10.0) -> int:
        """How many payloads carried by some broker have not reached them all, once no more arrive (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [set(self.carried(n)) for n in range(len(self.brokers))]
            missing = len(set.union(*seen) - set.intersection(*seen))
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)

    def stop(self) -> None:
        for sniffer in self.sniffers:
            sniffer.stop()
        for broker in self.brokers:
            broker.stop()
        for relay in self.relays:
            relay.stop()


# -- rtchat.py subprocesses -----------------------------------------------------------------------------------

def cli_env(broker_url: str, **extra: str) -> dict:
    """The environment of an rtchat.py subprocess: this broker, loopback ICE, no colour, none of the caller's
    RTCHAT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_") or k == "RTCHAT_IN_PRIVATE_NETNS"}
    env.update(RTCHAT_BROKER=broker_url, NO_COLOR="1", PYTHONUNBUFFERED="1", **LOOPBACK_ICE_ENV, **extra)
    return env


def rtchat_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "rtchat.py"), *args]


class Proc:
    """An rtchat.py subprocess whose stdout and stderr lines are collected as they come, to be waited on."""

    def __init__(self, args, env, stdin=subprocess.DEVNULL):
        self.args = args
        self.proc = subprocess.Popen(rtchat_cmd(*args), env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, lines):
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def events(self) -> list[dict]:
        """stdout as --json objects."""
        return [json.loads(line) for line in list(self.out)]

    def messages(self, **match) -> list[dict]:
        return [e for e in self.events() if e["type"] in ("message", "dm")
                and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, predicate, timeout=30.0, what="output"):
        """Until predicate(self) holds, checked whenever a line comes; AssertionError with the output after
        timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.args[0]}: timed out waiting for {what}; stdout {self.out[-20:]}, "
                                         f"stderr {self.err[-20:]}")
                self._changed.wait(remaining)

    def said(self, text: str, timeout=30.0) -> None:
        """Until a line of stderr contains text (e.g. "listening" once a listener is in its room)."""
        self.wait_for(lambda p: any(text in line for line in p.err), timeout, repr(text))

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        """Send sig (unless it has exited), wait for the exit code; kill it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.kill()

    def finish(self, timeout=30) -> int:
        """Wait for it to exit by itself and for all its output; its exit code."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code


# -- waiting ---------------------------------------------------------------------------------------------------

def run(coro, timeout: float = 60):
    """Run a coroutine to completion on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(predicate, timeout: float = 10.0, what: str = "condition"):
    """Until predicate() holds, checked every 20 ms, at most timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
