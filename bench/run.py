#!/usr/bin/env python3
"""rtchat.py benchmark: every figure next to a raw aiortc/paho baseline measured in the same run.

    python bench/run.py                    all figures, full repetitions (a few minutes)
    python bench/run.py --quick            few repetitions, N <= 5, small bulk (CI: proves it still works)
    python bench/run.py --only 1,3         selected figures (1 setup, 2 signaling bytes, 3 round trip,
                                           4 bulk, 5 pipe/startup, 6 room scale, 7 gossip simulation,
                                           8 chat-ready through NATs and TURN: needs root, coturn,
                                           9 round trip through a relaying member, relay CPU)
    python bench/run.py --out FILE.json    where the results go (default bench/results/<timestamp>.json)

Loopback only: as root the benchmark moves itself into a private network namespace in which only `lo` is up
(figure 8 builds the NAT lab of tests/netlab.py: namespaces of its own, addresses only inside them),
starts its own mosquitto on a free 127.0.0.1 port, and points ICE at 127.0.0.1 with no STUN. Peers are
separate processes (this file run with --worker rt|raw) that talk to the orchestrator in JSON lines.
Timestamps are time.monotonic(), which is CLOCK_MONOTONIC and so comparable across processes on Linux.
No timing is asserted: the figures are printed and saved, goals are shown for reading.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import random
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RTCHAT = Path(os.environ.get("RTCHAT_BENCH_SRC") or ROOT / "rtchat.py")  # a snapshot, set in orchestrate()
mono = time.monotonic
sys.path.insert(0, str(ROOT / "tests"))
import support  # noqa: E402  (the tests' broker, network namespace, loopback ICE and sniffer)

# =============================================================================
# Small helpers
# =============================================================================

def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "p10": pct(values, 10), "p90": pct(values, 90), "values": [round(v, 4) for v in values]}


def rand_tag(n: int = 6) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def paced(channel, count: int, send, low: int, high: int) -> dict:
    """send() count times, the same back-pressure for rtchat and the baseline: above `high` bytes buffered,
    wait until the channel drains to `low`."""
    channel.bufferedAmountLowThreshold = low
    drained = asyncio.Event()
    channel.on("bufferedamountlow", drained.set)
    t0 = mono()
    for _ in range(count):
        if channel.bufferedAmount > high:
            drained.clear()
            await asyncio.wait_for(drained.wait(), 60)
        send()
    return {"t0": t0, "t_sent": mono(), "count": count}


# =============================================================================
# Workers: one peer per process, driven over stdin/stdout JSON lines.
# Request {"id", "cmd", ...} -> reply {"id", "ok", ...}; unsolicited {"event", ...}.
# =============================================================================

class RtWorker:
    """A peer made with rtchat's library API (what a bot or the CLI does)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(RTCHAT.parent))
        import rtchat
        self.rt = rtchat
        self.client = None
        self.rooms: dict[str, object] = {}
        self.listeners: list[tuple[object, str, object]] = []

    async def do_start(self, name: str, broker: str, state: str, full_mesh: bool = False) -> dict:
        t = mono()
        options = {"max_peers": 0} if full_mesh and "max_peers" in inspect.signature(self.rt.Client).parameters else {}
        self.client = self.rt.Client(name, broker=broker, state=state, files=state + ".files", **support.LOOPBACK_ICE,
                                     **options)
        self.client.questions["echo"] = lambda q: q.content
        await self.client.start()
        return {"t_start": t, "t_started": mono(), "me": self.client.me, "pid": os.getpid()}

    async def do_published(self) -> dict:
        return {"bytes": self.client.signaling.published_bytes}

    async def do_join(self, room: str, expect: int = 1) -> dict:
        t0 = mono()
        r = await self.client.join(room)
        self.rooms[room] = r
        reported = False

        def on_verified(peer) -> None:
            nonlocal reported
            if not reported and len(r.verified_peers()) >= expect:
                reported = True
                out({"event": "ready", "room": room, "t": mono(), "peers": len(r.verified_peers())})
        r.on("verified", on_verified)
        return {"t_join": t0, "t_joined": mono()}

    async def do_leave(self, room: str) -> dict:
        r = self.rooms.pop(room, None)
        if r is not None:
            await self.client.leave(r)
        return {}

    async def do_echo(self, room: str) -> dict:
        r = self.rooms[room]

        def echo(msg) -> None:
            if msg.text.startswith("ping"):
                r.send(msg.text)
        r.on("message", echo)
        return {}

    async def do_expect(self, room: str, prefix: str, count: int) -> dict:
        """Emit {"event": "got"} with the time the count-th message starting with prefix arrived."""
        r = self.rooms[room]
        got = 0
        first = None
        nbytes = 0

        def on_msg(msg) -> None:
            nonlocal got, first, nbytes
            if not msg.text.startswith(prefix):
                return
            got += 1
            nbytes += len(msg.text)
            first = first or mono()
            if got == count:
                out({"event": "got", "room": room, "prefix": prefix, "t": mono(), "t_first": first,
                     "bytes": nbytes})
                r.off("message", on_msg)
        r.on("message", on_msg)
        return {}

    async def do_expect_file(self, room: str) -> dict:
        r = self.rooms[room]

        def on_file(got) -> None:
            out({"event": "file", "t": mono(), "bytes": got.size})
            r.off("file", on_file)
            got.path.unlink()
        r.on("file", on_file)
        return {}

    async def do_send_file(self, room: str, path: str) -> dict:
        r = self.rooms[room]
        t0 = mono()
        await r.send_file(r.verified_peers()[0].name, path)
        return {"t0": t0, "t_done": mono()}

    async def do_send(self, room: str, text: str) -> dict:
        t = mono()
        self.rooms[room].send(text)
        return {"t": t}

    async def do_rtt(self, room: str, n: int, warm: int, size: int, mode: str) -> dict:
        r = self.rooms[room]
        peer = r.verified_peers()[0]
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future] = {}

        def on_msg(msg) -> None:
            fut = waiting.pop(msg.text, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        r.on("message", on_msg)
        rtts = []
        try:
            for i in range(warm + n):
                text = f"ping{i:06d}".ljust(size, "x")
                t = time.perf_counter()
                if mode == "send":
                    waiting[text] = fut = loop.create_future()
                    r.send(text)
                    await asyncio.wait_for(fut, 5)
                else:
                    answer = await r.ask(peer.name, "echo", text, timeout=5)
                    assert answer == text, answer
                if i >= warm:
                    rtts.append((time.perf_counter() - t) * 1000)
        finally:
            r.off("message", on_msg)
        return {"rtt_ms": rtts}

    async def do_bulk(self, room: str, total: int, size: int, low: int, high: int) -> dict:
        r = self.rooms[room]
        body = "B" + "".join(random.choices(string.ascii_letters, k=size - 1))
        return await paced(r.verified_peers()[0].channels["chat"], total // size, lambda: r.send(body), low, high)

    async def do_quit(self) -> dict:
        if self.client is not None:
            await self.client.close()
        return {}


class RawWorker:
    """The floor: plain aiortc + paho (loop_start thread), one data channel, JSON offer/answer over mosquitto."""

    def __init__(self) -> None:
        support.offer_only_loopback()
        import paho.mqtt.client as mqtt
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        self.mqtt, self.RTCPeerConnection, self.RTCSessionDescription = mqtt, RTCPeerConnection, RTCSessionDescription
        self.config = RTCConfiguration(iceServers=[])
        self.pcs: dict[str, object] = {}
        self.channels: dict[str, object] = {}
        self.opened: dict[str, asyncio.Future] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.echo = False
        self.mesh_room = None
        self.expect = 0
        self.ready_sent = False
        self.bulk_expect = 0
        self.bulk_got = 0
        self.bulk_first = None
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def do_start(self, name: str, host: str, port: int) -> dict:
        t = mono()
        self.me = name
        self.loop = asyncio.get_running_loop()
        connected, subscribed = self.loop.create_future(), self.loop.create_future()
        c = self.mqtt.Client(self.mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{name}-{rand_tag()}")
        c.on_connect = lambda *a: self.loop.call_soon_threadsafe(connected.set_result, None)
        c.on_subscribe = lambda *a: self.loop.call_soon_threadsafe(
            lambda: subscribed.done() or subscribed.set_result(None))
        c.on_message = lambda cl, u, m: self.loop.call_soon_threadsafe(self.on_mqtt, m.payload)
        await self.loop.run_in_executor(None, c.connect, host, port, 30)
        c.loop_start()
        await asyncio.wait_for(connected, 10)
        c.subscribe([(f"rawbench/to/{name}", 0), ("rawbench/hello/#", 0)])
        await asyncio.wait_for(subscribed, 10)
        self.mq = c
        return {"t_start": t, "t_started": mono(), "pid": os.getpid()}

    def publish(self, topic: str, obj: dict) -> None:
        self.mq.publish(topic, json.dumps(obj).encode(), qos=0)

    def on_mqtt(self, payload: bytes) -> None:
        msg = json.loads(payload)
        kind, sender = msg["type"], msg["from"]
        if sender == self.me:
            return
        if kind == "offer":
            self.spawn(self.answer(sender, msg["sdp"]))
        elif kind == "answer" and sender in self.pcs:
            self.spawn(self.pcs[sender].setRemoteDescription(self.RTCSessionDescription(msg["sdp"], "answer")))
        elif kind == "hello" and msg.get("room") == self.mesh_room and self.me < sender:
            self.spawn(self.offer(sender))

    def new_pc(self, peer: str):
        pc = self.RTCPeerConnection(self.config)
        self.pcs[peer] = pc
        self.opened.setdefault(peer, self.loop.create_future())
        return pc

    async def offer(self, peer: str) -> None:
        pc = self.new_pc(peer)
        channel = pc.createDataChannel("chat")
        channel.on("open", lambda: self.on_open(peer, channel))
        await pc.setLocalDescription(await pc.createOffer())
        self.publish(f"rawbench/to/{peer}", {"type": "offer", "from": self.me, "sdp": pc.localDescription.sdp})

    async def answer(self, peer: str, sdp: str) -> None:
        pc = self.new_pc(peer)
        pc.on("datachannel", lambda channel: self.on_open(peer, channel))
        await pc.setRemoteDescription(self.RTCSessionDescription(sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        self.publish(f"rawbench/to/{peer}", {"type": "answer", "from": self.me, "sdp": pc.localDescription.sdp})

    def on_open(self, peer: str, channel) -> None:
        t = mono()
        self.channels[peer] = channel
        channel.on("message", lambda data: self.on_data(channel, data))
        fut = self.opened.setdefault(peer, self.loop.create_future())
        if not fut.done():
            fut.set_result(t)
        out({"event": "open", "peer": peer, "t": t})
        if self.expect and not self.ready_sent and sum(f.done() for f in self.opened.values()) >= self.expect:
            self.ready_sent = True
            out({"event": "ready", "room": self.mesh_room, "t": t, "peers": self.expect})

    def on_data(self, channel, data) -> None:
        if data[:1] == "B":
            self.bulk_got += len(data)
            self.bulk_first = self.bulk_first or mono()
            if self.bulk_expect and self.bulk_got >= self.bulk_expect:
                out({"event": "got", "prefix": "B", "t": mono(), "t_first": self.bulk_first, "bytes": self.bulk_got})
                self.bulk_expect = 0
        elif self.echo:
            channel.send(data)
        else:
            fut = self.waiting.pop(data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def do_connect(self, peer: str) -> dict:
        t0 = mono()
        await self.offer(peer)
        t_open = await asyncio.wait_for(self.opened[peer], 15)
        return {"t0": t0, "t_open": t_open}

    async def do_close_all(self) -> dict:
        pcs = list(self.pcs.values())
        self.pcs.clear()
        self.channels.clear()
        self.opened.clear()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        return {}

    async def do_mesh_prepare(self, room: str, expect: int) -> dict:
        self.mesh_room, self.expect, self.ready_sent = room, expect, False
        return {}

    async def do_mesh(self, room: str) -> dict:
        t = mono()
        self.publish(f"rawbench/hello/{room}", {"type": "hello", "from": self.me, "room": room})
        return {"t_join": t}

    async def do_set_echo(self, on: bool) -> dict:
        self.echo = on
        return {}

    async def do_rtt(self, peer: str, n: int, warm: int, size: int) -> dict:
        channel = self.channels[peer]
        rtts = []
        for i in range(warm + n):
            text = f"ping{i:06d}".ljust(size, "x")
            self.waiting[text] = fut = self.loop.create_future()
            t = time.perf_counter()
            channel.send(text)
            await asyncio.wait_for(fut, 5)
            if i >= warm:
                rtts.append((time.perf_counter() - t) * 1000)
        return {"rtt_ms": rtts}

    async def do_expect_bulk(self, total: int) -> dict:
        self.bulk_expect, self.bulk_got, self.bulk_first = total, 0, None
        return {}

    async def do_bulk(self, peer: str, total: int, size: int, low: int, high: int) -> dict:
        channel = self.channels[peer]
        body = "B" + "".join(random.choices(string.ascii_letters, k=size - 1))
        return await paced(channel, total // size, lambda: channel.send(body), low, high)

    async def do_quit(self) -> dict:
        await self.do_close_all()
        if getattr(self, "mq", None) is not None:
            self.mq.disconnect()
            self.mq.loop_stop()
        return {}


async def worker_main(kind: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 ** 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = RtWorker() if kind == "rt" else RawWorker()
    out({"event": "hello", "pid": os.getpid(), "t": mono()})
    tasks: set[asyncio.Task] = set()

    async def handle(req: dict) -> None:
        try:
            args = {k: v for k, v in req.items() if k not in ("id", "cmd")}
            result = await getattr(worker, "do_" + req["cmd"])(**args)
            out({"id": req["id"], "ok": True, **(result or {})})
        except Exception as exc:
            out({"id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc()[-2000:]})

    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        task = asyncio.ensure_future(handle(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if req["cmd"] == "quit":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, 10)
            break


# =============================================================================
# Orchestrator side: worker processes (the broker and the sniffer are the tests' own, tests/support.py).
# =============================================================================

class Worker:
    """A worker process seen from the orchestrator."""

    all: list[Worker] = []

    def __init__(self, kind: str, tag: str, logdir: Path) -> None:
        self.kind, self.tag = kind, tag
        self.logpath = logdir / f"{kind}-{tag}.log"
        self.events: list[dict] = []
        self.replies: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.changed = asyncio.Event()
        self.proc = None
        self.pid = None

    async def spawn(self) -> Worker:
        self.logfile = open(self.logpath, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--worker", self.kind,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.logfile, limit=2 ** 24)
        Worker.all.append(self)
        self.reader = asyncio.ensure_future(self._read())
        hello = await self.wait_event(lambda e: e["event"] == "hello", 60)
        self.pid = hello["pid"]
        return self

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "id" in obj:
                fut = self.replies.pop(obj["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(obj)
            else:
                self.events.append(obj)
                self.changed.set()
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"worker {self.tag} exited; see {self.logpath}"))
        self.changed.set()

    async def call(self, cmd: str, timeout: float = 60, **args) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = fut
        self.proc.stdin.write((json.dumps({"id": self.next_id, "cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(fut, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.tag} {cmd}: {reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    async def wait_event(self, pred, timeout: float) -> dict:
        deadline = mono() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    return self.events.pop(i)
            remaining = deadline - mono()
            if remaining <= 0 or (self.proc.returncode is not None and self.reader.done()):
                raise asyncio.TimeoutError(f"{self.tag}: no event in {timeout:g} s")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.call("quit", timeout=10)
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            self.logfile.close()


async def stop_all(workers: list[Worker]) -> None:
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    for w in workers:
        with contextlib.suppress(ValueError):
            Worker.all.remove(w)


# =============================================================================
# The figures
# =============================================================================

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, broker: support.Broker,
                 sniffer: support.Sniffer) -> None:
        self.args, self.workdir, self.broker, self.sniffer = args, workdir, broker, sniffer
        self.quick = args.quick
        self.results: dict = {}
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def state(self, name: str) -> str:
        return str(self.workdir / f"state-{name}.json")

    async def rt(self, name: str, full_mesh: bool = False) -> Worker:
        """A library client in a process of its own (full_mesh: never a large room, as figure 6 measures)."""
        w = await Worker("rt", name, self.workdir).spawn()
        await w.call("start", name=name, broker=self.broker.url, state=self.state(name), full_mesh=full_mesh)
        return w

    async def raw(self, name: str) -> Worker:
        w = await Worker("raw", name, self.workdir).spawn()
        await w.call("start", name=name, host="127.0.0.1", port=self.broker.tcp_port)
        return w

    def row(self, fig: str, metric: str, ours: dict | float | None, base: dict | float | None, unit: str,
            goal: str = "", ratio: bool = True, fmt: str = "{:.1f}") -> None:
        self.rows.append({"figure": fig, "metric": metric, "rtchat": ours, "baseline": base, "unit": unit,
                          "goal": goal, "ratio": ratio, "fmt": fmt})

    # -- figures 1 and 2: setup time and signaling bytes ---------------------------------------
    async def fig_setup(self) -> None:
        reps = 2 if self.quick else 8
        sim_reps = 1 if self.quick else 3
        gap = 1.2
        ann, bob = await asyncio.gather(self.rt("ann"), self.rt("bob"))
        rann, rbob = await asyncio.gather(self.raw("rann"), self.raw("rbob"))
        cases = {"joiner-offers": [], "listener-offers": [], "near-simultaneous": []}
        raw_ms, raw_bytes = [], []
        bytes_runs: list[dict] = []
        try:
            # one unmeasured warm-up of each, so first-connection costs (keygen, first pin write) are apart
            await self.rt_connect_once(bob, ann, gap=0.3, record=None)
            await rbob.call("close_all")
            r = await rann.call("connect", peer="rbob")
            await rann.call("close_all")
            await rbob.call("close_all")
            for rep in range(max(reps, sim_reps)):
                if rep < reps:
                    # raw floor: offer/answer over the same broker, one channel, open on both sides
                    t_mark = mono()
                    r = await rann.call("connect", peer="rbob")
                    ev = await rbob.wait_event(lambda e: e["event"] == "open", 15)
                    raw_ms.append((max(r["t_open"], ev["t"]) - r["t0"]) * 1000)
                    recs = self.sniffer.window("rawbench/to/", t_mark, mono())
                    raw_bytes.append(sum(len(p) for _, _, p in recs))
                    await asyncio.gather(rann.call("close_all"), rbob.call("close_all"))
                    # rtchat: listener bob has been in the room for `gap`, then ann joins
                    # ("ann" < "bob", so the joiner is the one that offers: connect -> connect -> offer -> answer)
                    cases["joiner-offers"].append(await self.rt_connect_once(bob, ann, gap, bytes_runs))
                    # listener ann, joiner bob: ann offers as soon as bob's connect arrives
                    cases["listener-offers"].append(await self.rt_connect_once(ann, bob, gap, None))
                if rep < sim_reps:
                    # both start within 0.3 s of each other (e.g. a script that starts two bots)
                    cases["near-simultaneous"].append(await self.rt_connect_once(bob, ann, 0.3, None))
        finally:
            await stop_all([ann, bob, rann, rbob])
        base = summary(raw_ms)
        self.results["1_setup"] = {"rtchat_ms": {k: summary(v) for k, v in cases.items()}, "raw_ms": base,
                                   "method": "two library-client processes; listener joins, joiner joins `gap` "
                                             f"({gap} s, or 0.3 s for near-simultaneous) later; t0 = joiner's "
                                             "join(); ready = both report a verified peer. Raw: offerer's "
                                             "t0 before RTCPeerConnection() to both sides open."}
        self.row("1 setup", "chat-ready, joiner offers (ms)", summary(cases["joiner-offers"]), base, "ms",
                 "≤100 ms")
        self.row("1 setup", "chat-ready, listener offers (ms)", summary(cases["listener-offers"]), base, "ms",
                 "≤100 ms")
        self.row("1 setup", "chat-ready, started ≤0.3 s apart (ms)", summary(cases["near-simultaneous"]), base,
                 "ms", "≤100 ms")
        # figure 2
        per_sub: dict[str, list[int]] = {}
        totals = [b["total"] for b in bytes_runs]
        for b in bytes_runs:
            for sub, n in b["by_subtopic"].items():
                per_sub.setdefault(sub, []).append(n)
        self.results["2_signaling_bytes"] = {
            "rtchat_total": summary(totals),
            "rtchat_published_bytes_delta": summary([b["published"] for b in bytes_runs]),
            "by_subtopic": {k: summary(v) for k, v in per_sub.items()},
            "anatomy": bytes_runs[-1]["anatomy"] if bytes_runs else None,
            "raw_total": summary(raw_bytes),
            "method": "sniffer paho client on mrtchat/#: every payload between the joiner's join() and both "
                      "ready, joiner-offers case; cross-checked with client.signaling.published_bytes deltas"}
        self.row("2 bytes", "signaling bytes per connection", summary(totals), summary(raw_bytes), "B",
                 "≤1.5 kB", fmt="{:.0f}")
        for sub, v in sorted(per_sub.items()):
            self.row("2 bytes", f"  of which {sub}", summary(v), None, "B", "", ratio=False, fmt="{:.0f}")

    async def rt_connect_once(self, listener: Worker, joiner: Worker, gap: float, record: list | None) -> float:
        room = f"setup-{rand_tag()}"
        await listener.call("join", room=room, expect=1)
        await asyncio.sleep(gap)
        pub0 = [(await w.call("published"))["bytes"] for w in (listener, joiner)]
        r = await joiner.call("join", room=room, expect=1)
        t0 = r["t_join"]
        evs = await asyncio.gather(*(w.wait_event(lambda e: e["event"] == "ready" and e["room"] == room, 20)
                                     for w in (listener, joiner)))
        t_ready = max(e["t"] for e in evs)
        await asyncio.sleep(0.05)
        if record is not None:
            pub1 = [(await w.call("published"))["bytes"] for w in (listener, joiner)]
            recs = self.sniffer.window("mrtchat/" + room, t0, t_ready + 0.02)
            record.append(self.bytes_breakdown(recs, sum(pub1) - sum(pub0)))
        await asyncio.gather(joiner.call("leave", room=room), listener.call("leave", room=room))
        await asyncio.sleep(0.1)
        return (t_ready - t0) * 1000

    def bytes_breakdown(self, recs, published: int) -> dict:
        sys.path.insert(0, str(RTCHAT.parent))
        import rtchat
        by_sub: dict[str, int] = {}
        anatomy = {}
        for _, _, payload in recs:
            env = rtchat.decode_envelope(payload)
            sub = env["subtopic"] if env else "?"
            by_sub[f"{sub} ({env['sender'] if env else '?'})" if sub == "connect" else sub] = \
                by_sub.get(sub, 0) + len(payload)
            if env:
                data = env["data"]
                sdp = ""
                if sub == "RTCOffer":
                    sdp = data["offer"]["localDescription"]["sdp"]
                elif sub == "RTCAnswer":
                    sdp = data["localDescription"]["sdp"]
                js = rtchat.to_json(env)
                anatomy[sub] = {"payload": len(payload), "encoding": "compact" if payload.startswith(
                                    rtchat.COMPACT_MAGIC) else "lz-string", "json": len(js), "sdp": len(sdp),
                                "sig_b64": len(env.get("sig", "")),
                                "public_key": len(json.dumps(data.get("publicKeyString", "")
                                                             if isinstance(data, dict) else "")),
                                "zlib_json": len(__import__("zlib").compress(js.encode(), 9))}
        by_sub = {k.split(" (")[0] if not k.startswith("connect") else k: v for k, v in by_sub.items()}
        return {"total": sum(len(p) for _, _, p in recs), "published": published, "by_subtopic": by_sub,
                "messages": len(recs), "anatomy": anatomy}

    # -- figures 3 and 4: round trip and bulk --------------------------------------------------
    async def fig_rtt_bulk(self, do_rtt: bool, do_bulk: bool) -> None:
        ann, bob = await asyncio.gather(self.rt("ann"), self.rt("bob"))
        rann, rbob = await asyncio.gather(self.raw("rann"), self.raw("rbob"))
        try:
            room = f"perf-{rand_tag()}"
            await bob.call("join", room=room, expect=1)
            await ann.call("join", room=room, expect=1)
            await asyncio.gather(*(w.wait_event(lambda e: e["event"] == "ready", 20) for w in (ann, bob)))
            await bob.call("echo", room=room)
            await rann.call("connect", peer="rbob")
            await rbob.wait_event(lambda e: e["event"] == "open", 15)
            if do_rtt:
                await self.fig_rtt(ann, rann, rbob, room)
            if do_bulk:
                await self.fig_bulk(ann, bob, rann, rbob, room)
        finally:
            await stop_all([ann, bob, rann, rbob])

    async def fig_rtt(self, ann: Worker, rann: Worker, rbob: Worker, room: str) -> None:
        series, n, warm, block = (1, 200, 30, 50) if self.quick else (3, 1000, 100, 100)
        size = 100
        send, ask, raw = ({"p50": [], "p99": [], "all": []} for _ in range(3))
        await rbob.call("set_echo", on=True)
        calls = {"raw": lambda k, w: rann.call("rtt", peer="rbob", n=k, warm=w, size=size, timeout=300),
                 "send": lambda k, w: ann.call("rtt", room=room, n=k, warm=w, size=size, mode="send", timeout=300),
                 "ask": lambda k, w: ann.call("rtt", room=room, n=k, warm=w, size=size, mode="ask", timeout=300)}
        targets = {"raw": raw, "send": send, "ask": ask}
        order = list(calls)
        for _ in range(series):
            # Interleaved blocks: a slow phase of a shared machine hits the baseline and us alike.
            rtts: dict[str, list[float]] = {kind: [] for kind in calls}
            for b in range(n // block):
                for kind in order[b % 3:] + order[:b % 3]:
                    rtts[kind] += (await calls[kind](block, warm if b == 0 else 5))["rtt_ms"]
            for kind, values in rtts.items():
                targets[kind]["p50"].append(pct(values, 50))
                targets[kind]["p99"].append(pct(values, 99))
                targets[kind]["all"].append(values)
        await rbob.call("set_echo", on=False)
        self.results["3_rtt"] = {k: {"p50": summary(v["p50"]), "p99": summary(v["p99"]),
                                     "pooled_p50": pct(sum(v["all"], []), 50), "pooled_p99": pct(sum(v["all"], []), 99)}
                                 for k, v in (("room_send_echo", send), ("ask_answer", ask), ("raw", raw))}
        self.results["3_rtt"]["method"] = (f"{series} series x {n} sequential {size}-char messages after {warm} "
                                           f"warm-ups, in interleaved blocks of {block} (raw, send, ask, rotating); "
                                           "room.send -> peer's message handler echoes with room.send; "
                                           "ask: room.ask(peer, 'echo', text) answered by a question handler; "
                                           "raw: plain channel.send echoed by the other side's message handler")
        self.row("3 rtt", "room.send echo p50 (ms)", summary(send["p50"]), summary(raw["p50"]), "ms", "≤1.5×",
                 fmt="{:.3f}")
        self.row("3 rtt", "room.send echo p99 (ms)", summary(send["p99"]), summary(raw["p99"]), "ms", "≤1.5×",
                 fmt="{:.3f}")
        self.row("3 rtt", "ask/answer p50 (ms)", summary(ask["p50"]), summary(raw["p50"]), "ms", "≤1.5×",
                 fmt="{:.3f}")
        self.row("3 rtt", "ask/answer p99 (ms)", summary(ask["p99"]), summary(raw["p99"]), "ms", "≤1.5×",
                 fmt="{:.3f}")

    async def fig_bulk(self, ann: Worker, bob: Worker, rann: Worker, rbob: Worker, room: str) -> None:
        reps, total = (2, 2 * 2 ** 20) if self.quick else (4, 16 * 2 ** 20)
        size, low, high = 16 * 1024, 256 * 1024, 1024 * 1024
        ours, base, files = [], [], []
        blob = self.workdir / "bulk.bin"
        blob.write_bytes(random.randbytes(total))
        await rbob.call("set_echo", on=False)
        for _ in range(reps):
            await rbob.call("expect_bulk", total=total)
            r = await rann.call("bulk", peer="rbob", total=total, size=size, low=low, high=high, timeout=300)
            ev = await rbob.wait_event(lambda e: e["event"] == "got", 300)
            base.append(ev["bytes"] / (ev["t"] - r["t0"]) / 1e6)
            prefix = "B"
            count = total // size
            await bob.call("expect", room=room, prefix=prefix, count=count)
            r = await ann.call("bulk", room=room, total=total, size=size, low=low, high=high, timeout=300)
            ev = await bob.wait_event(lambda e: e["event"] == "got", 300)
            ours.append(ev["bytes"] / (ev["t"] - r["t0"]) / 1e6)
            await asyncio.sleep(0.5)
            await bob.call("expect_file", room=room)
            r = await ann.call("send_file", room=room, path=str(blob), timeout=300)
            ev = await bob.wait_event(lambda e: e["event"] == "file", 300)
            files.append(ev["bytes"] / (ev["t"] - r["t0"]) / 1e6)
            await asyncio.sleep(0.5)
        self.results["4_bulk"] = {"rtchat_MBps": summary(ours), "raw_MBps": summary(base),
                                  "file_MBps": summary(files),
                                  "method": f"{reps} reps x {total >> 20} MiB; raw: {size}-byte channel.send; "
                                            "file: room.send_file (16 KiB binary chunks on a channel of its own, "
                                            "hashed on the way; the receiver writes, checks and fsyncs); chat: "
                                            f"{size}-char room.send texts (signed, kept in history, acked); all "
                                            f"wait for bufferedamountlow above {high >> 10} KiB (low {low >> 10} "
                                            "KiB); MB/s = payload / (receiver has it all - sender's start)"}
        self.row("4 bulk", "file transfer, /send (MB/s)", summary(files), summary(base), "MB/s", "≥0.8×")
        self.row("4 bulk", "16 KiB chat messages (MB/s)", summary(ours), summary(base), "MB/s", "")

    # -- figure 5: pipe mode and startup -------------------------------------------------------
    def cli(self, name: str, room: str, *extra: str) -> list[str]:
        return [str(RTCHAT), name, "--room", room, "--broker", self.broker.url, "--state", self.state(name),
                *support.LOOPBACK_ICE_ARGS, *extra]

    async def fig_pipe(self) -> None:
        reps = 2 if self.quick else 8
        probe_reps = 1 if self.quick else 3
        tty_reps = 2 if self.quick else 5
        room = f"pipe-{rand_tag()}"
        listener = await asyncio.create_subprocess_exec(
            sys.executable, *self.cli("mia", room, "--listen", "--json"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=2 ** 24)
        lines: list[tuple[float, dict]] = []
        changed = asyncio.Event()

        async def read_listener() -> None:
            while line := await listener.stdout.readline():
                with contextlib.suppress(ValueError):
                    lines.append((mono(), json.loads(line)))
                    changed.set()
        reader = asyncio.ensure_future(read_listener())
        results: dict = {"pipe_offers": [], "pipe_answers": [], "probe": [], "tty_prompt": [], "tty_exit": []}
        try:
            deadline = mono() + 20
            while mono() < deadline:  # wait for "listening in #..." on its stderr
                line = await asyncio.wait_for(listener.stderr.readline(), 20)
                if b"listening" in line or not line:
                    break
            asyncio.ensure_future(listener.stderr.read())  # keep draining
            # warm-up: makes state files (RSA key generation) and pins, so reps measure a returning user
            for name in ("ann", "zoe"):
                await self.pipe_once(name, room, lines, changed)
            for _rep in range(reps):
                results["pipe_offers"].append(await self.pipe_once("ann", room, lines, changed))
                results["pipe_answers"].append(await self.pipe_once("zoe", room, lines, changed))
            for _rep in range(probe_reps):
                results["probe"].append(await self.pipe_once("ann", room, lines, changed, probe=True))
            for _rep in range(tty_reps):
                prompt, exit_s = await asyncio.get_running_loop().run_in_executor(
                    None, self.tty_once, "tim", f"tty-{rand_tag()}")
                results["tty_prompt"].append(prompt)
                results["tty_exit"].append(exit_s)
        finally:
            listener.terminate()
            try:
                await asyncio.wait_for(listener.wait(), 5)
            except asyncio.TimeoutError:
                listener.kill()
                await listener.wait()
            reader.cancel()
        floors = await self.startup_floors()
        delivered = [r["delivered"] for r in results["pipe_offers"]]
        exited = [r["exited"] for r in results["pipe_offers"]]
        phases: dict[str, list[float]] = {}
        for p in results["probe"]:
            for k, v in p["phases"].items():
                phases.setdefault(k, []).append(v)
        self.results["5_pipe"] = {
            "pipe_sender_offers": {"delivered_s": summary(delivered), "exited_s": summary(exited),
                                   "rc": [r["rc"] for r in results["pipe_offers"]]},
            "pipe_listener_offers": {"delivered_s": summary([r["delivered"] for r in results["pipe_answers"]]),
                                     "exited_s": summary([r["exited"] for r in results["pipe_answers"]])},
            "breakdown_s": {k: summary(v) for k, v in phases.items()},
            "probe_runs": results["probe"],
            "tty_prompt_s": summary(results["tty_prompt"]), "tty_ctrl_d_exit_s": summary(results["tty_exit"]),
            "floors": floors,
            "method": "`python3 rtchat.py ann ...` with 'hi' already on stdin and a `--listen --json` rtchat.py "
                      "running in the room; delivered = listener printed it; exited = the pipe process ended. "
                      "Breakdown: the same run under a -c probe that compiles/executes rtchat.py like the "
                      "interpreter does for a script and timestamps library calls. tty: under a pty, until "
                      "the '[room] ' prompt is drawn."}
        connect = floors.get("raw_connect_s") or 0.0
        deliver_floor = floors["python_imports_ready_s"]["median"] + connect
        exit_floor = floors["python_imports_exit_s"]["median"] + connect
        self.notes.append("figure 5 baselines are composed in this run: a child that imports asyncio, aiortc, paho "
                          "and cryptography (until it prints / until it has exited) plus the raw connect median of "
                          "figure 1 (0 if figure 1 did not run); tty: the same imports plus prompt_toolkit")
        self.row("5 pipe", "echo hi | rtchat.py: delivered (s)", summary(delivered), deliver_floor, "s", "",
                 fmt="{:.3f}")
        self.row("5 pipe", "echo hi | rtchat.py: exited (s), sender offers", summary(exited), exit_floor, "s",
                 "≤1.0 s", fmt="{:.3f}")
        self.row("5 pipe", "exited (s), listener offers", summary([r["exited"] for r in results["pipe_answers"]]),
                 exit_floor, "s", "≤1.0 s", fmt="{:.3f}")
        for k, v in phases.items():
            self.row("5 pipe", f"  phase: {k} (s)", summary(v), None, "s", "", ratio=False, fmt="{:.3f}")
        self.row("5 pipe", "tty: start to prompt (s)", summary(results["tty_prompt"]),
                 floors["python_imports_tty_ready_s"]["median"], "s", "≤0.6 s", fmt="{:.3f}")
        self.row("5 pipe", "tty: Ctrl-D to exit (s)", summary(results["tty_exit"]), None, "s", "", ratio=False,
                 fmt="{:.3f}")

    async def pipe_once(self, name: str, room: str, lines, changed, probe: bool = False) -> dict:
        text = f"hi-{rand_tag(8)}"
        tsfile = self.workdir / f"probe-{rand_tag()}.json"
        env = dict(os.environ, BENCH_TS_FILE=str(tsfile), BENCH_RTCHAT=str(RTCHAT))
        argv = ([sys.executable, "-c", PROBE, *self.cli(name, room)[1:]] if probe
                else [sys.executable, *self.cli(name, room)])
        t0 = mono()
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, env=env)
        proc.stdin.write((text + "\n").encode())
        proc.stdin.close()
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        try:
            rc = await asyncio.wait_for(proc.wait(), 40)
        except asyncio.TimeoutError:
            proc.kill()
            rc = await proc.wait()
        t_exit = mono()
        err = (await stderr_task).decode(errors="replace")
        t_deliv = None
        deadline = mono() + 5
        while t_deliv is None and mono() < deadline:
            t_deliv = next((t for t, obj in lines if obj.get("type") == "message" and obj.get("text") == text),
                           None)
            if t_deliv is None:
                changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.5)
        if rc != 0:
            self.notes.append(f"pipe run {name} exited {rc}: {err.strip()[-300:]}")
        result = {"rc": rc, "exited": t_exit - t0, "delivered": (t_deliv - t0) if t_deliv else None}
        if probe:
            marks = json.loads(tsfile.read_text()) if tsfile.exists() else []
            result["marks"] = [(n, round(t - t0, 4)) for n, t in marks]
            result["phases"] = probe_phases(marks, t0, t_exit, t_deliv)
        await asyncio.sleep(0.4)  # let the listener see the unload
        return result

    def tty_once(self, name: str, room: str) -> tuple[float | None, float | None]:
        import pty
        import select
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm", COLUMNS="100", LINES="30")
        t0 = mono()
        proc = subprocess.Popen([sys.executable, *self.cli(name, room)], stdin=slave, stdout=slave, stderr=slave,
                                env=env, start_new_session=True)
        os.close(slave)
        buf = b""
        t_prompt = t_exit = t_quit = None
        want = f"[{room}]".encode()
        deadline = mono() + 30
        try:
            while mono() < deadline:
                r, _, _ = select.select([master], [], [], 0.1)
                if r:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:
                        chunk = b""
                    if not chunk:  # the child closed the terminal: it is exiting
                        if t_prompt is not None:
                            with contextlib.suppress(subprocess.TimeoutExpired):
                                proc.wait(10)
                                t_exit = mono() - t_quit
                        break
                    buf += chunk
                    if b"\x1b[6n" in chunk:
                        os.write(master, b"\x1b[1;1R")  # answer prompt_toolkit's cursor position request
                    plain = re.sub(rb"\x1b\[[0-?]*[ -/]*[@-~]", b"", buf)
                    if t_prompt is None and want in plain:
                        t_prompt = mono()
                        time.sleep(0.2)
                        t_quit = mono()
                        os.write(master, b"\x04")
                if t_prompt is not None and proc.poll() is not None:
                    t_exit = mono() - t_quit
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            os.close(master)
        return (t_prompt - t0 if t_prompt else None), t_exit

    async def startup_floors(self) -> dict:
        """Bare interpreter and the dependencies' imports, as a child process: until it prints, and until it exits."""
        async def wall(code: str) -> tuple[float, float]:
            t = mono()
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", code + "; print('r', flush=True)",
                                                     stdout=asyncio.subprocess.PIPE)
            await p.stdout.readline()
            t_ready = mono()
            await p.wait()
            return t_ready - t, mono() - t
        reps = 3 if self.quick else 7
        floors = {}
        for key, code in (("python_bare", "pass"),
                          ("python_imports", "import asyncio, aiortc, paho.mqtt.client, cryptography"),
                          ("python_imports_tty", "import asyncio, aiortc, paho.mqtt.client, cryptography, "
                                                 "prompt_toolkit"),
                          ("compile_rtchat", f"compile(open({str(RTCHAT)!r}).read(), 'rtchat.py', 'exec')")):
            await wall(code)
            runs = [await wall(code) for _ in range(reps)]
            floors[key + "_ready_s"] = summary([r[0] for r in runs])
            floors[key + "_exit_s"] = summary([r[1] for r in runs])
        floors["compile_rtchat_s"] = (floors["compile_rtchat_ready_s"]["median"]
                                      - floors["python_bare_ready_s"]["median"])
        raw_ms = self.results.get("1_setup", {}).get("raw_ms", {}).get("median")
        floors["raw_connect_s"] = raw_ms / 1000 if raw_ms else None
        return floors

    # -- figure 8: chat-ready through NATs and TURN (the NAT lab of tests/netlab.py) ---------------
    NETWORK_CELLS = (  # (label, sender's kind, listener's kind, TURN); the first is the baseline
        ("no NAT, direct", "open", "open", False),
        ("no NAT, TURN configured", "open", "open", True),
        ("port-restricted both, hole punched", "restricted", "restricted", False),
        ("full cone to symmetric", "fullcone", "symmetric", False),
        ("symmetric both, TURN relay", "symmetric", "symmetric", True),
        ("UDP blocked to no NAT, TURN over TCP", "udpblocked", "open", True),
    )

    async def fig_networks(self) -> None:
        import netlab  # beside support.py, in tests/
        reason = netlab.unavailable()
        if reason:
            self.notes.append(f"figure 8 skipped: {reason}")
            return
        reps = 1 if self.quick else 5
        kinds = {kind for _, a, b, _ in self.NETWORK_CELLS for kind in (a, b)}
        ready: dict[str, list[float]] = {label: [] for label, *_ in self.NETWORK_CELLS}
        with netlab.Lab(self.workdir, [(f"{kind}{n}", kind) for kind in sorted(kinds) for n in (1, 2)]) as lab:
            for rep in range(reps + 1):  # the first round is a warm-up (keys, pins, first imports)
                for label, a, b, turn in self.NETWORK_CELLS:
                    ms = await self.lab_cell(lab, lab.clients[f"{a}1"], lab.clients[f"{b}2"], turn)
                    if rep:
                        ready[label].append(ms)
        base = summary(ready[self.NETWORK_CELLS[0][0]])
        self.results["8_networks"] = {"ready_ms": {k: summary(v) for k, v in ready.items()}, "method": (
            "NAT lab of tests/netlab.py; a listener in the room, then a pipe sender behind the other router; "
            "ready = from the sender's 'waiting for' (in the room) to its '--> ... joined (verified' line. "
            "Sequential cells; baseline: both without NAT, STUN only")}
        for label, *_ in self.NETWORK_CELLS:
            self.row("8 networks", f"chat-ready: {label}", summary(ready[label]), base, "ms", fmt="{:.0f}")

    async def lab_cell(self, lab, sender: object, listener: object, turn: bool) -> float | None:
        """Milliseconds from a pipe sender in its room to its listener verified, one behind each router."""
        room = f"net-{rand_tag()}"

        def command(client, *extra: str) -> list[str]:
            ice = lab.stun_urls() + ([lab.turn_url(tcp=client.kind == "udpblocked")] if turn else [])
            return ["ip", "netns", "exec", client.ns, sys.executable, str(RTCHAT), f"{client.kind}-{client.name}",
                    "--room", room, "--broker", lab.broker_url, "--state", self.state(client.name), "--ice",
                    ",".join(ice), "--ice-host", client.address, *extra]
        procs = []
        try:
            procs.append(await asyncio.create_subprocess_exec(
                *command(listener, "--listen"), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
            while (line := await asyncio.wait_for(procs[0].stderr.readline(), 30)) and b"listening" not in line:
                pass
            procs.append(await asyncio.create_subprocess_exec(
                *command(sender, "--timeout", "30"), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
            procs[1].stdin.write(b"hi\n")
            procs[1].stdin.close()
            joined = None
            while line := await asyncio.wait_for(procs[1].stderr.readline(), 60):
                if b"waiting for" in line:
                    joined = mono()
                elif b"joined (verified" in line and joined is not None:
                    return (mono() - joined) * 1000
            self.notes.append(f"figure 8: {sender.kind} to {listener.kind} (turn={turn}) did not connect")
            return None
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    # -- figure 6: room scale --------------------------------------------------------------------
    async def fig_scale(self) -> None:
        sizes = [int(x) for x in self.args.sizes.split(",")] if self.args.sizes else [2, 5] if self.quick \
            else [2, 5, 10, 20]
        out_rows = self.results["6_scale"] = {}
        for n in sizes:
            try:
                ours = await self.scale_rt(n)
            except Exception as exc:
                ours = {"ready_s": None, "delivered_s": None, "rss_mb": [], "error": f"{type(exc).__name__} {exc}"}
                self.notes.append(f"scale N={n}: rtchat run failed: {type(exc).__name__} {exc}")
            base = await self.scale_raw(n)
            out_rows[str(n)] = {"rtchat": ours, "raw": base}
            self.row("6 scale", f"N={n}: full mesh ready (s)", ours["ready_s"], base["ready_s"], "s",
                     "≤10 s at 20", fmt="{:.3f}")
            self.row("6 scale", f"N={n}: all N·(N-1) delivered (s)", ours["delivered_s"], None, "s", "",
                     ratio=False, fmt="{:.3f}")
            self.row("6 scale", f"N={n}: idle RSS per process (MB)", summary(ours["rss_mb"]),
                     summary(base["rss_mb"]), "MB", "≤95 MB")
        self.results["6_scale"]["method"] = ("N library-client processes started and broker-connected first; "
                                             "then all join one room at once; ready = every process sees N-1 "
                                             "verified peers, from the first join(). Then each sends one message "
                                             "at once; delivered = the last of N·(N-1) arrivals. RSS after 3 s "
                                             "idle. Raw: N aiortc+paho processes, all subscribed, each says hello, "
                                             "lower name offers; one channel per pair.")

    async def scale_rt(self, n: int) -> dict:
        names = [f"p{i:02d}" for i in range(n)]
        ws = []
        try:
            for i in range(0, n, 4):  # start in small groups: 20 concurrent imports on 2 cores thrash
                ws += await asyncio.gather(*(self.rt(name, full_mesh=True) for name in names[i:i + 4]))
            room = f"scale{n}-{rand_tag()}"
            cpu0 = [cpu_s(w.pid) for w in ws]
            joins = await asyncio.gather(*(w.call("join", room=room, expect=n - 1) for w in ws))
            t0 = min(j["t_join"] for j in joins)
            ready_ts, missing = [], 0
            timeout = 30 if self.quick else 60
            evs = await asyncio.gather(*(w.wait_event(lambda e: e["event"] == "ready", timeout) for w in ws),
                                       return_exceptions=True)
            for e in evs:
                if isinstance(e, dict):
                    ready_ts.append(e["t"] - t0)
                else:
                    missing += 1
            cpu1 = [cpu_s(w.pid) for w in ws]
            await asyncio.gather(*(w.call("expect", room=room, prefix="m-", count=n - 1) for w in ws))
            sends = await asyncio.gather(*(w.call("send", room=room, text=f"m-{w.tag}", timeout=20) for w in ws),
                                         return_exceptions=True)
            t_send = min((s["t"] for s in sends if isinstance(s, dict)), default=mono())
            got = await asyncio.gather(*(w.wait_event(lambda e: e["event"] == "got", 20) for w in ws),
                                       return_exceptions=True)
            got_ts = [g["t"] - t_send for g in got if isinstance(g, dict)]
            await asyncio.sleep(3)
            rss = [rss_mb(w.pid) for w in ws]
            cpu2 = [cpu_s(w.pid) for w in ws]
            await asyncio.sleep(5)
            cpu3 = [cpu_s(w.pid) for w in ws]
            idle_cpu = [(c3 - c2) / 5 * 100 for c2, c3 in zip(cpu2, cpu3, strict=False)
                        if c2 is not None and c3 is not None]
            return {"ready_s": max(ready_ts) if not missing and ready_ts else None,
                    "ready_per_process_s": summary(ready_ts), "not_ready": missing,
                    "ready_within_timeout": f"{n - missing}/{n} processes ({timeout} s)",
                    "delivered_s": max(got_ts) if len(got_ts) == n else None, "delivered_processes": len(got_ts),
                    "rss_mb": rss, "setup_cpu_s": summary([b - a for a, b in zip(cpu0, cpu1, strict=False) if a and b]),
                    "idle_cpu_pct": summary(idle_cpu)}
        finally:
            await stop_all(ws)

    async def scale_raw(self, n: int) -> dict:
        names = [f"r{i:02d}" for i in range(n)]
        ws = []
        try:
            for i in range(0, n, 4):
                ws += await asyncio.gather(*(self.raw(name) for name in names[i:i + 4]))
            room = f"rawscale{n}-{rand_tag()}"
            await asyncio.gather(*(w.call("mesh_prepare", room=room, expect=n - 1) for w in ws))
            joins = await asyncio.gather(*(w.call("mesh", room=room) for w in ws))
            t0 = min(j["t_join"] for j in joins)
            evs = await asyncio.gather(*(w.wait_event(lambda e: e["event"] == "ready", 20 if self.quick else 60)
                                         for w in ws),
                                       return_exceptions=True)
            ts = [e["t"] - t0 for e in evs if isinstance(e, dict)]
            await asyncio.sleep(3)
            return {"ready_s": max(ts) if len(ts) == n else None, "ready_per_process_s": summary(ts),
                    "rss_mb": [rss_mb(w.pid) for w in ws]}
        finally:
            await stop_all(ws)

    # -- figure 9: a round trip through a relaying member, and its CPU (bench/relay_bench.py) -------------------
    async def fig_relay(self) -> None:
        sys.path.insert(0, str(RTCHAT.parent))  # this run's snapshot
        import relay_bench

        import rtchat
        results, rows = await asyncio.to_thread(relay_bench.figure, rtchat, self.broker.url, self.workdir,
                                                self.quick)
        self.results["9_relay"] = results
        self.notes.append("figure 9: " + results["method"])
        for r in rows:
            self.row(r["fig"], r["metric"], summary(r["ours"]), summary(r["base"]), r["unit"], r["goal"])

    # -- figure 7: the gossip core in a simulated large room (bench/gossip_sim.py) ------------------------------
    async def fig_gossip_sim(self) -> None:
        sys.path.insert(0, str(RTCHAT.parent))  # gossip_sim imports rtchat: this run's snapshot
        import gossip_sim
        results, rows = await asyncio.to_thread(gossip_sim.figure, self.quick, self.args.seed or 1)
        self.results["7_gossip_sim"] = results
        self.notes.append("figure 7: " + results["method"])
        for r in rows:
            self.row(**r)


PROBE = r'''
import sys, time, os, json, atexit, types
T = [("probe_start", time.monotonic())]
def mark(name):
    T.append((name, time.monotonic()))
def dump():
    mark("atexit")
    with open(os.environ["BENCH_TS_FILE"], "w") as f:
        json.dump(T, f)
atexit.register(dump)
path = os.environ["BENCH_RTCHAT"]
src = open(path, encoding="utf-8").read()
code = compile(src, path, "exec"); mark("compiled")
mod = types.ModuleType("rtchat"); mod.__file__ = path; sys.modules["rtchat"] = mod
exec(code, mod.__dict__); mark("imported")
seen = set()
def wrap(cls, name, before=None, after=None, once=False):
    orig = getattr(cls, name)
    import inspect
    if inspect.iscoroutinefunction(orig):
        async def w(*a, **k):
            if before and not (once and before in seen): seen.add(before); mark(before)
            r = await orig(*a, **k)
            if after and not (once and after in seen): seen.add(after); mark(after)
            return r
    else:
        def w(*a, **k):
            if before and not (once and before in seen): seen.add(before); mark(before)
            r = orig(*a, **k)
            if after and not (once and after in seen): seen.add(after); mark(after)
            return r
    setattr(cls, name, w)
wrap(mod.Client, "__init__", "client_init", "client_made")
wrap(mod.Client, "start", "client_start")
wrap(mod.Store, "identity", "identity_begin", "identity_end", once=True)
wrap(mod.Signaling, "connect", "broker_begin", "broker_end")
wrap(mod.Room, "join", "join_begin", "join_end")
STEPS = {"heard": "got_connect", "offering": "offer_begin", "offer-sent": "offer_sent", "offered": "got_offer",
         "answered": "got_answer", "open": "peer_open", "verified": "verified"}
def on_phase(name, step):  # the "phase" events of Negotiation and Sessions: how far the first session got, and when
    if step in STEPS and STEPS[step] not in seen: seen.add(STEPS[step]); mark(STEPS[step])
room_init = mod.Room.__init__
def watched_room(self, *a, **k):
    room_init(self, *a, **k); self.negotiation.on("phase", on_phase); self.sessions.on("phase", on_phase)
mod.Room.__init__ = watched_room
wrap(mod.Room, "send", "send_begin", once=True)
wrap(mod.Room, "flush", None, "flushed", once=True)
wrap(mod.Client, "close", "close_begin", "close_end")
rc = mod.main(sys.argv[1:]); mark("main_returned")
sys.exit(rc)
'''


def probe_phases(marks: list, t0: float, t_exit: float, t_deliv: float | None) -> dict:
    m: dict[str, float] = {}
    for name, t in marks:
        m.setdefault(name, t)
    def span(a, b):
        return (m[b] - m[a]) if a in m and b in m else None
    phases = {
        "interpreter start": (m["probe_start"] - t0) if "probe_start" in m else None,
        "compile rtchat.py": span("probe_start", "compiled"),
        "imports + module body": span("compiled", "imported"),
        "args, plugins, Client()": span("imported", "client_start"),
        "state file + identity + instance": span("client_start", "broker_begin"),
        "broker connect": span("broker_begin", "broker_end"),
        "join (subscribe, announce)": span("join_begin", "join_end"),
        "discovery (until offer/answer starts)": (min(m.get("offer_begin", 1e18), m.get("got_offer", 1e18))
                                                  - m["join_end"]) if "join_end" in m else None,
        "peer connect (offer/answer to channels open)": (m["peer_open"] - min(m.get("offer_begin", 1e18),
                                                         m.get("got_offer", 1e18))) if "peer_open" in m else None,
        "verify": span("peer_open", "verified"),
        "send until acked (flush)": span("send_begin", "flushed"),
        "close (leave, broker disconnect)": span("close_begin", "close_end"),
        "asyncio.run teardown": span("close_end", "main_returned"),
        "interpreter finalization and exit": (t_exit - m["atexit"]) if "atexit" in m else None,
    }
    if t_deliv is not None and "send_begin" in m:
        phases["send to listener printed"] = t_deliv - m["send_begin"]
    return {k: v for k, v in phases.items() if v is not None}


# =============================================================================
# Report
# =============================================================================

def fmt_cell(v, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    if not v.get("n"):
        return "–"
    if v["n"] == 1:
        return fmt.format(v["median"])
    return f"{fmt.format(v['median'])} ({fmt.format(v['min'])}–{fmt.format(v['max'])})"


def med(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return v.get("median")


def render(rows: list[dict]) -> str:
    head = ["figure", "metric", "rtchat median (min–max)", "baseline median (min–max)", "ratio", "goal"]
    body = []
    for r in rows:
        a, b = med(r["rtchat"]), med(r["baseline"])
        ratio = f"{a / b:.2f}×" if r["ratio"] and a and b else ""
        body.append([r["figure"], r["metric"], fmt_cell(r["rtchat"], r["fmt"]), fmt_cell(r["baseline"], r["fmt"]),
                     ratio, r["goal"]])
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=False)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in body]
    return "\n".join(lines)


async def orchestrate(args: argparse.Namespace, network: str) -> int:
    figures = {int(x) for x in args.only.split(",")} if args.only else {1, 2, 3, 4, 5, 6, 7, 8, 9}
    global RTCHAT
    workdir = Path(tempfile.mkdtemp(prefix="rtchat-bench-"))
    # One consistent rtchat.py for the whole run, even if the file is edited meanwhile.
    source = Path(args.rtchat).resolve()
    (workdir / "src").mkdir()
    RTCHAT = workdir / "src" / "rtchat.py"
    shutil.copy2(source, RTCHAT)
    os.environ["RTCHAT_BENCH_SRC"] = str(RTCHAT)
    broker = support.Broker(workdir).start()
    sniffer = support.Sniffer(broker.tcp_port, ("mrtchat/#", "rawbench/#"))
    bench = Bench(args, workdir, broker, sniffer)
    started = time.time()
    failures = []
    try:
        steps = []
        if figures & {1, 2}:
            steps.append(("setup", bench.fig_setup))
        if figures & {3, 4}:
            steps.append(("rtt/bulk", lambda: bench.fig_rtt_bulk(3 in figures, 4 in figures)))
        if 5 in figures:
            steps.append(("pipe", bench.fig_pipe))
        if 6 in figures:
            steps.append(("scale", bench.fig_scale))
        if 7 in figures:
            steps.append(("gossip sim", bench.fig_gossip_sim))
        if 8 in figures:
            steps.append(("networks", bench.fig_networks))
        if 9 in figures:
            steps.append(("relay", bench.fig_relay))
        for label, step in steps:
            t = mono()
            print(f"bench: {label} ...", file=sys.stderr, flush=True)
            try:
                await step()
            except Exception as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"bench: {label} FAILED: {exc}\n{traceback.format_exc()}", file=sys.stderr)
            print(f"bench: {label} took {mono() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        await stop_all(list(Worker.all))
        sniffer.stop()
        broker.stop()
    table = render(bench.rows)
    print(table)
    for note in bench.notes[:10]:
        print("note:", note)
    for failure in failures:
        print("FAILED:", failure)
    import aiortc
    import cryptography
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "quick": args.quick, "figures": sorted(figures),
            "network": network, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "kernel": platform.release(), "aiortc": aiortc.__version__,
            "cryptography": cryptography.__version__,
            "rtchat": str(Path(args.rtchat).resolve()),
            "rtchat_sha256": __import__("hashlib").sha256(RTCHAT.read_bytes()).hexdigest(),
            "process_model": "every peer is its own process (library worker or rtchat.py CLI)"}
    path = Path(args.out) if args.out else HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": bench.results, "table": table, "notes": bench.notes,
                                "failures": failures}, indent=1, default=str))
    print(f"results: {path}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work dir (logs, state files): {workdir}", file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions, N up to 5, small bulk (< ~60 s)")
    parser.add_argument("--only", metavar="LIST", help="comma-separated figures: 1..9")
    parser.add_argument("--out", metavar="FILE", help="results JSON (default bench/results/<timestamp>.json)")
    parser.add_argument("--sizes", metavar="LIST", help="figure 6 room sizes (default 2,5,10,20; quick 2,5)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (worker logs, state files)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rtchat", default=str(ROOT / "rtchat.py"),
                        help="the rtchat.py to measure (copied once at start; default: the one beside bench/)")
    parser.add_argument("--worker", choices=("rt", "raw"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main(args.worker))
        return 0
    random.seed(args.seed)
    network = support.enter_private_network()
    print(f"bench: network: {network}", file=sys.stderr)
    return asyncio.run(orchestrate(args, network))


if __name__ == "__main__":
    sys.exit(main())
