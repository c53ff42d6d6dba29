"""Browser interop (issue 3): real RTChat pages (headless Chromium) and rtchat.py share rooms.

Needs, else every test is skipped with the reason printed:
  * RTCHAT_SRC: a checkout of github.com/modularizer/rtchat (never copied into this project);
  * RTCHAT_NODE_MODULES (mqtt + lz-string@1.4.4, see the harness README);
  * a Python with Playwright: RTCHAT_HARNESS_PYTHON, default /tmp/harness-venv/bin/python;
  * the harness: RTCHAT_HARNESS_DIR, default ../shared/interop beside this project (browser_peer.py);
  * chromium (CHROMIUM_PATH or /usr/bin/chromium) and mosquitto with websockets.

Loopback only: every scenario runs in a child process (`python test_browser_interop.py SCENARIO`)
with its own mosquitto on free 127.0.0.1 ports; rtchat.py uses no ICE servers and only the host
address 127.0.0.1; the harness strips the browsers' STUN servers and aborts non-local requests.
If this process can see interfaces other than lo, the child is started in a fresh network
namespace (`unshare -n`, lo only) when that is possible; otherwise it runs here, and Chromium may
still list other local addresses as host candidates, which then reach only our own broker.

Each scenario prints one line `RESULT {json}` (timings, who offered, ...); run with -s to see them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DRIVER = HERE / "browser_driver_interop.py"
HARNESS_DIR = Path(os.environ.get("RTCHAT_HARNESS_DIR", PROJECT.parent / "shared" / "interop"))
SCENARIO_TIMEOUT_S = 110


# =============================================================================
# prerequisites
# =============================================================================

def harness_python() -> str | None:
    explicit = os.environ.get("RTCHAT_HARNESS_PYTHON")
    if explicit:
        return explicit
    default = "/tmp/harness-venv/bin/python"
    return default if os.path.exists(default) else None


def missing_prerequisite() -> str | None:
    src = os.environ.get("RTCHAT_SRC")
    if not src:
        return "RTCHAT_SRC not set"
    if not (Path(src) / "bundles" / "rtchat-core.esm.js").is_file():
        return f"RTCHAT_SRC={src} is not an RTChat checkout (bundles/rtchat-core.esm.js missing)"
    nm = os.environ.get("RTCHAT_NODE_MODULES")
    if not (os.environ.get("RTCHAT_MQTT_JS") or (nm and (Path(nm) / "mqtt/dist/mqtt.min.js").is_file())):
        return "RTCHAT_NODE_MODULES (with mqtt and lz-string@1.4.4) not set"
    if not (HARNESS_DIR / "browser_peer.py").is_file():
        return f"harness {HARNESS_DIR}/browser_peer.py not found (set RTCHAT_HARNESS_DIR)"
    py = harness_python()
    if not py or not os.path.exists(py):
        return "no Python with Playwright (set RTCHAT_HARNESS_PYTHON; default /tmp/harness-venv/bin/python)"
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        return f"chromium not found at {chromium} (set CHROMIUM_PATH)"
    if not shutil.which("mosquitto"):
        return "mosquitto not installed"
    try:
        subprocess.run([py, "-c", "import playwright.async_api"], check=True, capture_output=True, timeout=30)
    except Exception:
        return f"{py} cannot import playwright"
    try:
        import aiortc  # noqa: F401
        import paho.mqtt  # noqa: F401
    except ImportError as exc:
        return f"rtchat.py's packages are missing here: {exc}"
    return None


def only_loopback_visible() -> bool:
    try:
        return {name for _, name in socket.if_nameindex()} <= {"lo"}
    except OSError:
        return False


def namespace_prefix() -> list[str]:
    """`unshare -n` with lo up, when we see other interfaces and may make a namespace."""
    if only_loopback_visible():
        return []
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    print("browser interop: cannot make a loopback-only network namespace; running in this one "
          "(our side still uses 127.0.0.1 only)")
    return []


_PREREQ: list = []


def run_scenario(name: str) -> dict:
    if not _PREREQ:
        _PREREQ.append(missing_prerequisite())
    reason = _PREREQ[0]
    if reason:
        print(f"browser interop: {reason}")
        pytest.skip(f"browser interop: {reason}")
    cmd = namespace_prefix() + [sys.executable, str(Path(__file__).resolve()), name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S + 15,
                              cwd=str(PROJECT))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {name} hung; output:\n{(exc.stdout or '')[-4000:]}\n{(exc.stderr or '')[-4000:]}")
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            print(line)
    if proc.returncode != 0:
        pytest.fail(f"scenario {name} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return result or {}


# =============================================================================
# inside a scenario process: broker, browsers, rtchat.py
# =============================================================================

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on 127.0.0.1: plain TCP for rtchat.py, websockets for the browsers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.tcp = self.ws = 0

    def _config(self, bind_lo: bool) -> Path:
        self.tcp, self.ws = free_port(), free_port()
        lines = [f"listener {self.tcp} 127.0.0.1", f"listener {self.ws} 127.0.0.1", "protocol websockets"]
        # mosquitto 2.0.11 binds a websockets listener on *:port despite the address unless told
        # socket_domain + bind_interface (as the harness mosquitto.conf does).
        lines += ["socket_domain ipv4"] + (["bind_interface lo"] if bind_lo else [])
        lines += ["allow_anonymous true", "persistence false", "log_dest stdout", "log_type all"]
        path = self.workdir / f"mosquitto-{int(bind_lo)}.conf"
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        return path

    def start(self) -> Broker:
        for bind_lo in (True, False):
            conf = self._config(bind_lo)
            log = open(self.workdir / "mosquitto.log", "ab")
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                if all(self._listening(p) for p in (self.tcp, self.ws)):
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("mosquitto did not start: " + (self.workdir / "mosquitto.log").read_text()[-2000:])

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws}"

    @property
    def tcp_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.tcp}"


class Browsers:
    """The browser driver subprocess (harness venv) and its events."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        self.workdir = workdir
        self.broker = broker
        self.events: list[dict] = []
        self.proc = None
        self._replies: dict[int, asyncio.Future] = {}
        self._n = 0
        self._changed = asyncio.Event()
        self._reader = None
        self._stderr = None

    async def start(self) -> Browsers:
        env = dict(os.environ)
        env.setdefault("RTCHAT_BROKER", self.broker.ws_url)
        self._stderr = open(self.workdir / "driver.err", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            harness_python(), str(DRIVER), "--harness", str(HARNESS_DIR), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._stderr, env=env, limit=16 * 1024 * 1024)
        self._reader = asyncio.ensure_future(self._read())
        await self.wait_event(lambda e: e.get("event") == "driver_ready", 30)
        return self

    async def _read(self) -> None:
        with open(self.workdir / "driver.jsonl", "w") as log:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                log.write(line.decode(errors="replace"))
                log.flush()
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "reply" in msg:
                    fut = self._replies.pop(msg["reply"], None)
                    if fut and not fut.done():
                        if msg.get("ok"):
                            fut.set_result(msg.get("result"))
                        else:
                            fut.set_exception(RuntimeError(f"driver: {msg.get('error')}\n{msg.get('trace', '')}"))
                else:
                    self.events.append(msg)
                    self._changed.set()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(RuntimeError("browser driver exited"))
        self._changed.set()

    async def call(self, cmd: str, timeout: float = 45, **kw):
        self._n += 1
        fut = asyncio.get_running_loop().create_future()
        self._replies[self._n] = fut
        self.proc.stdin.write((json.dumps(dict(kw, id=self._n, cmd=cmd)) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(fut, timeout)

    async def start_peer(self, name: str, room: str, key: str | None = None, **kw) -> dict:
        return await self.call("start", key=key or name, name=name, room=room, broker=self.broker.ws_url, **kw)

    async def wait_event(self, pred, timeout: float = 30):
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.returncode is not None):
                raise TimeoutError(f"no such browser event within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def find(self, key: str, event: str, **fields) -> list[dict]:
        return [e for e in self.events if e.get("key") == key and e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    async def validated(self, key: str, peer: str, timeout: float = 30, after: float = 0.0) -> dict:
        return await self.wait_event(lambda e: e.get("key") == key and e.get("event") == "peer_validated"
                                     and e.get("peer") == peer and e.get("ts", 0) >= after, timeout)

    async def got(self, key: str, event: str, text: str, timeout: float = 15) -> dict:
        return await self.wait_event(lambda e: e.get("key") == key and e.get("event") == event
                                     and text in str(e.get("text")), timeout)

    async def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            await self.call("quit", timeout=5)
        try:
            await asyncio.wait_for(self.proc.wait(), 25)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        if self._stderr:
            self._stderr.close()


def rtchat_module():
    sys.path.insert(0, str(PROJECT))
    import rtchat
    return rtchat


class Recorder:
    """Observes rtchat.py from outside: which identity questions browsers asked us, which we asked."""

    def __init__(self, rtchat) -> None:
        self.asked_us: list[tuple[str, str]] = []     # (peer, topic) browsers asked rtchat.py
        self.we_asked: list[tuple[str, str]] = []     # (peer, topic) rtchat.py asked
        orig_identity, orig_ask = rtchat.answer_identity, rtchat.Peer.ask
        rec = self

        def answer_identity(peer, value, identity):
            q = value.get("question") if isinstance(value, dict) else None
            if isinstance(q, dict) and q.get("topic") in ("identify", "challenge"):
                rec.asked_us.append((peer.name, q["topic"]))
            return orig_identity(peer, value, identity)

        async def ask(self, topic, content=None, timeout=rtchat.ASK_TIMEOUT_S):
            rec.we_asked.append((self.name, topic))
            return await orig_ask(self, topic, content, timeout)
        rtchat.answer_identity = answer_identity
        rtchat.Peer.ask = ask


class PyPeer:
    """An rtchat.py Client in this process, with everything it emits recorded."""

    def __init__(self, rtchat, name: str, broker: Broker, workdir: Path, state: Path | None = None) -> None:
        self.rtchat = rtchat
        self.name = name
        self.state = state or workdir / f"{name}.json"
        self.client = rtchat.Client(name, broker=broker.tcp_url, state=str(self.state), ice=[],
                                    ice_hosts=["127.0.0.1"])
        self.room = None
        self.events: list[tuple[float, str, object]] = []
        self.t_start = 0.0
        self._changed = asyncio.Event()

    async def start(self, room: str) -> PyPeer:
        self.t_start = time.time()
        await self.client.start()
        self.room = await self.client.join(room)
        for event in ("message", "dm", "join", "leave", "verified", "key-changed", "status"):
            self.room.on(event, lambda *args, event=event: self._push(event, args))
        return self

    def _push(self, event: str, args: tuple) -> None:
        self.events.append((time.time(), event, args))
        self._changed.set()

    async def wait(self, pred, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            for item in self.events:
                if pred(*item):
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no such event within {timeout:g} s; had "
                                   f"{[(e, str(a)[:80]) for _, e, a in self.events]}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def joined(self, peer: str, timeout: float = 30, after: float = 0.0):
        return await self.wait(lambda t, e, a: e == "join" and a[0].name == peer and t >= after, timeout)

    async def left(self, peer: str, timeout: float = 30, after: float = 0.0):
        return await self.wait(lambda t, e, a: e == "leave" and a[0].name == peer and t >= after, timeout)

    async def got(self, kind: str, text: str, timeout: float = 15):
        return await self.wait(lambda t, e, a: e == kind and text in a[0].text, timeout)

    def peer(self, name: str):
        return self.room.peers.get(name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 10)


class Offers:
    """A passive MQTT subscriber that decodes the room's signaling (who offered to whom, candidates)."""

    def __init__(self, rtchat, broker: Broker, room: str) -> None:
        import paho.mqtt.client as mqtt
        self.rtchat = rtchat
        self.items: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"observer-{os.getpid()}-{os.urandom(4).hex()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"mrtchat/{room}")
        self.client.connect("127.0.0.1", broker.tcp)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        env = self.rtchat.decode_envelope(message.payload)
        if env:
            self.items.append({"sender": env["sender"], "subtopic": env["subtopic"], "data": env["data"],
                               "t": time.time(), "bytes": len(message.payload)})

    def offers(self) -> list[tuple[str, str]]:
        return [(m["sender"], (m["data"].get("offer") or {}).get("target")) for m in self.items
                if m["subtopic"] == "RTCOffer" and isinstance(m["data"], dict)]

    def candidates(self, sender: str) -> list[str]:
        return [m["data"].get("candidate") for m in self.items if m["subtopic"] == "RTCIceCandidate"
                and m["sender"] == sender and isinstance(m["data"], dict)]

    def stop(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


class Scene:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.rtchat = rtchat_module()
        self.recorder = Recorder(self.rtchat)
        self.broker = Broker(workdir).start()
        self.browsers: Browsers | None = None
        self.pys: list[PyPeer] = []
        self.observers: list[Offers] = []

    async def __aenter__(self) -> Scene:
        self.browsers = await Browsers(self.workdir, self.broker).start()
        return self

    async def __aexit__(self, *exc) -> None:
        for p in self.pys:
            await p.close()
        if self.browsers:
            await self.browsers.close()
        for o in self.observers:
            o.stop()
        self.broker.stop()

    def py(self, name: str, state: Path | None = None) -> PyPeer:
        p = PyPeer(self.rtchat, name, self.broker, self.workdir, state)
        self.pys.append(p)
        return p

    def observe(self, room: str) -> Offers:
        o = Offers(self.rtchat, self.broker, room)
        self.observers.append(o)
        return o

    async def pair(self, py_name: str, browser_name: str, room: str, *, key: str | None = None,
                   state: Path | None = None, storage: dict | None = None, mdns: bool = False,
                   fake_mdns: bool = False, timeout: float = 30) -> dict:
        """Start a browser and rtchat.py together; wait until each side can chat with the other."""
        key = key or browser_name
        py = self.py(py_name, state)
        b_task = asyncio.ensure_future(self.browsers.start_peer(browser_name, room, key=key, storage=storage,
                                                                mdns=mdns, fake_mdns=fake_mdns))
        await asyncio.sleep(0.05)
        await py.start(room)
        started = await b_task
        t0 = max(py.t_start, started["t_start"])
        b_ok = await self.browsers.validated(key, py.client.me, timeout)
        p_ok = await py.joined(browser_name, timeout)
        t_ready = max(b_ok["ts"], p_ok[0])
        return {"py": py, "key": key, "t0": t0, "ready_s": round(t_ready - t0, 3),
                "browser_validated_s": round(b_ok["ts"] - started["t_start"], 3),
                "py_verified_s": round(p_ok[0] - py.t_start, 3)}


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


async def chat_both_ways(scene: Scene, py: PyPeer, key: str, browser_name: str, tag: str) -> None:
    b = scene.browsers
    await b.call("send", key=key, text=f"hi from browser {tag}")
    await py.got("message", f"hi from browser {tag}")
    py.room.send(f"hello from python {tag}")
    ev = await b.got(key, "chat", f"hello from python {tag}")
    check(ev["from"] == py.client.me, f"browser attributes python's chat to {ev['from']}")
    msg = next(a[0] for _, e, a in py.events if e == "message" and f"browser {tag}" in a[0].text)
    check(msg.sender == browser_name and msg.trust == "legacy", f"python shows {msg.sender} trust {msg.trust}")


# =============================================================================
# scenarios (each runs in its own process; returns a dict for the RESULT line)
# =============================================================================

async def scenario_py_offers_and_pinned_rerun(workdir: Path) -> dict:
    """Python name sorts first under localeCompare ('bob' < 'Carl', unlike code-point order): Python
    offers. First contact: both sides use identify. Second run, keys pinned on both sides: challenge."""
    result = {}
    state = workdir / "bob.json"
    async with Scene(workdir) as scene:
        obs = scene.observe("r1")
        r = await scene.pair("bob", "Carl", "r1", state=state)
        py, key = r["py"], r["key"]
        peer = py.peer("Carl")
        check(peer.is_verified and not peer.channel_bound and not peer.is_rtchat_py,
              f"python's view of the browser: {peer.state} bound={peer.channel_bound}")
        check(("Carl", "identify") in scene.recorder.asked_us, f"browser asked {scene.recorder.asked_us}")
        check(("Carl", "identify") in scene.recorder.we_asked, f"python asked {scene.recorder.we_asked}")
        check(obs.offers()[:1] == [("bob", "Carl")], f"offers {obs.offers()}")
        await chat_both_ways(scene, py, key, "Carl", "run1")
        storage = await scene.browsers.call("storage", key=key)
        pinned = json.loads(storage.get("knownHostsStrings") or "{}")
        check("bob" in pinned, f"browser pinned {list(pinned)}")
        result["run1"] = {k: v for k, v in r.items() if k.endswith("_s")}
        result["run1"]["offers"] = obs.offers()
    keep = {k: storage[k] for k in ("publicKeyString", "privateKeyString", "knownHostsStrings") if k in storage}
    async with Scene(workdir) as scene:
        obs = scene.observe("r1")
        r = await scene.pair("bob", "Carl", "r1", state=state, storage=keep)
        py, key = r["py"], r["key"]
        check(("Carl", "challenge") in scene.recorder.asked_us, f"browser asked {scene.recorder.asked_us}")
        check(("Carl", "challenge") in scene.recorder.we_asked, f"python asked {scene.recorder.we_asked}")
        check(not scene.browsers.find(key, "dialog"), "a known peer should not prompt")
        await chat_both_ways(scene, py, key, "Carl", "run2")
        result["run2"] = {k: v for k, v in r.items() if k.endswith("_s")}
        result["run2"]["offers"] = obs.offers()
    return result


async def scenario_browser_offers_dm_ask(workdir: Path) -> dict:
    """Browser 'carl' sorts before Python 'Dave' (code-point order says the opposite): the browser
    offers. Chat, DMs both ways, /ask both ways."""
    async with Scene(workdir) as scene:
        obs = scene.observe("r2")
        r = await scene.pair("Dave", "carl", "r2")
        py, key, b = r["py"], r["key"], scene.browsers
        check(obs.offers()[:1] == [("carl", "Dave")], f"offers {obs.offers()}")
        await chat_both_ways(scene, py, key, "carl", "b-first")
        # DMs
        py.room.dm("carl", "secret for carl")
        await b.got(key, "dm", "secret for carl")
        await b.call("dm", key=key, to="Dave", text="secret for Dave")
        _, _, (dm,) = await py.got("dm", "secret for Dave")
        check(dm.kind == "dm" and dm.sender == "carl", f"dm {dm}")
        # Python asks the browser (the harness registers a handler through RTChat's addQuestionHandler)
        await b.call("add_question", key=key, topic="echo")
        answer = await py.room.ask("carl", "echo", {"x": 1})
        check(answer == {"echo": {"x": 1}, "from": "Dave", "by": "carl"}, f"browser answered {answer}")
        # a topic the browser has no handler for: RTChat throws and never replies
        t = time.monotonic()
        try:
            await py.room.ask("carl", "nosuchtopic", None, timeout=3)
            no_handler = "answered?"
        except scene.rtchat.AskError as exc:
            no_handler = f"AskError after {time.monotonic() - t:.1f} s: {exc}"
        # the browser asks Python
        py.client.questions["time"] = lambda q: {"asked_by": q.sender.name, "content": q.content}
        reply = await b.call("ask", key=key, to="Dave", topic="time", content="now?")
        check(reply == {"answer": {"asked_by": "carl", "content": "now?"}}, f"python answered {reply}")
        reply_unknown = await b.call("ask", key=key, to="Dave", topic="unknown", content=None, timeout=3)
        return {k: v for k, v in r.items() if k.endswith("_s")} | {
            "offers": obs.offers(), "ask_browser_no_handler": no_handler,
            "browser_asks_unknown_topic": reply_unknown}


async def scenario_glare(workdir: Path) -> dict:
    """Both sides offer: Python is made to offer (and announce) on every connect although the browser
    sorts first and offers too. Python keeps its offer and ignores the browser's; the browser yields.
    Variant 'immediate': Python's offer lands while the browser is still making its own; 'crossed':
    Python publishes 0.4 s late, so both offers are on the wire and cross."""
    out = {}
    async with Scene(workdir) as scene:
        rt = scene.rtchat
        orig_on_connect, orig_send_offer = rt.Negotiation._on_connect, rt.Negotiation._send_offer
        delays = {"r3a": 0.0, "r3b": 0.4}

        def on_connect(self, signal):
            self.should_offer = lambda name: True
            self.network.announce()
            orig_on_connect(self, signal)

        async def send_offer(self, peer):
            orig_publish, delay = self.network.publish, delays.get(self.topic.removeprefix(rt.TOPIC_BASE))

            def late_publish(subtopic, data, **options):
                if subtopic == "RTCOffer" and delay:
                    asyncio.get_running_loop().call_later(delay, lambda: orig_publish(subtopic, data, **options))
                else:
                    orig_publish(subtopic, data, **options)
            self.network.publish = late_publish
            try:
                await orig_send_offer(self, peer)
            finally:
                del self.network.publish
        rt.Negotiation._on_connect, rt.Negotiation._send_offer = on_connect, send_offer
        for room, (py_name, b_name) in zip(delays, (("zoe", "aaron"), ("yan", "abe")), strict=True):
            obs = scene.observe(room)
            r = await scene.pair(py_name, b_name, room, timeout=40)
            py, key = r["py"], r["key"]
            await chat_both_ways(scene, py, key, b_name, "glare")
            offers = obs.offers()
            check((py_name, b_name) in offers, f"offers {offers}")
            out["immediate" if room == "r3a" else "crossed"] = {k: v for k, v in r.items() if k.endswith("_s")} | {
                "offers": offers, "both_offered": (b_name, py_name) in offers,
                "browser_pcs_created": len(scene.browsers.find(key, "peerconnection_created"))}
    check(out["crossed"]["both_offered"], f"no real glare: {out}")
    return out


async def scenario_two_browsers_one_python(workdir: Path) -> dict:
    """'ann' and 'Cid' (browsers) + 'bea' (python): a full mesh; then ann reloads (leave + join),
    then Cid closes (leave)."""
    async with Scene(workdir) as scene:
        b = scene.browsers
        py = scene.py("bea")
        obs = scene.observe("r4")
        t0 = time.time()
        await asyncio.gather(b.start_peer("ann", "r4"), b.start_peer("Cid", "r4"), py.start("r4"))
        await asyncio.gather(py.joined("ann"), py.joined("Cid"), b.validated("ann", "bea"),
                             b.validated("Cid", "bea"), b.validated("ann", "Cid"), b.validated("Cid", "ann"))
        mesh_s = round(time.time() - t0, 3)
        await b.call("send", key="ann", text="from ann")
        await b.call("send", key="Cid", text="from Cid")
        py.room.send("from bea")
        await asyncio.gather(py.got("message", "from ann"), py.got("message", "from Cid"),
                             b.got("ann", "chat", "from bea"), b.got("Cid", "chat", "from bea"),
                             b.got("ann", "chat", "from Cid"), b.got("Cid", "chat", "from ann"))
        # reload ann's page: RTChat publishes unload from beforeunload, then comes back as ann
        t_reload = time.time()
        await b.call("reload", key="ann")
        _, _, (_, reload_reason) = await py.left("ann", 20, after=t_reload)
        reload_leave_s = round(time.time() - t_reload, 3)
        await py.joined("ann", 30, after=t_reload)
        await b.validated("ann", "bea", 30, after=t_reload)
        rejoin_s = round(time.time() - t_reload, 3)
        await b.call("send", key="ann", text="ann is back")
        await py.got("message", "ann is back")
        py.room.send("welcome back")
        await b.got("ann", "chat", "welcome back")
        # close Cid's page
        t_close = time.time()
        await b.call("close", key="Cid")
        _, _, (peer, reason) = await py.left("Cid", 20, after=t_close)
        return {"mesh_ready_s": mesh_s, "reload_leave_s": reload_leave_s, "reload_leave_reason": reload_reason,
                "reload_to_ready_again_s": rejoin_s, "close_seen_as_leave_s": round(time.time() - t_close, 3),
                "close_leave_reason": reason,
                "unloads_on_wire": [(m["sender"], m["bytes"], round(m["t"] - t0, 2)) for m in obs.items
                                    if m["subtopic"] == "unload"],
                "t_reload": round(t_reload - t0, 2), "t_close": round(t_close - t0, 2)}


async def scenario_one_browser_two_python(workdir: Path) -> dict:
    """'dan' (browser) + 'Cat' and 'eve' (rtchat.py, one process): a full mesh, chat among all."""
    async with Scene(workdir) as scene:
        b = scene.browsers
        cat, eve = scene.py("Cat"), scene.py("eve")
        t0 = time.time()
        await asyncio.gather(b.start_peer("dan", "r5"), cat.start("r5"), eve.start("r5"))
        await asyncio.gather(cat.joined("dan"), eve.joined("dan"), cat.joined("eve"), eve.joined("Cat"),
                             b.validated("dan", "Cat"), b.validated("dan", "eve"))
        mesh_s = round(time.time() - t0, 3)
        check(cat.peer("eve").channel_bound and cat.peer("eve").is_rtchat_py, "python<->python is channel-bound")
        check(not cat.peer("dan").channel_bound, "browser is legacy")
        await b.call("send", key="dan", text="from dan")
        cat.room.send("from Cat")
        eve.room.send("from eve")
        await asyncio.gather(cat.got("message", "from dan"), eve.got("message", "from dan"),
                             cat.got("message", "from eve"), eve.got("message", "from Cat"),
                             b.got("dan", "chat", "from Cat"), b.got("dan", "chat", "from eve"))
        return {"mesh_ready_s": mesh_s}


async def scenario_mdns(workdir: Path) -> dict:
    """Browsers that publish mDNS host candidates ('<uuid>.local', what an ordinary page's Chrome
    sends). A real `--mdns-candidates` Chrome gathers no candidate at all in a lo-only namespace,
    so the driver renames the candidates RTChat publishes (fake_mdns) while the browser's ICE keeps
    using 127.0.0.1. rtchat.py cannot resolve the names (aioice's multicast query fails or times
    out) and must connect through peer-reflexive candidates: the browser checks the host candidates
    in rtchat.py's SDP, and aioice learns the browser's address from those checks."""
    out = {}
    async with Scene(workdir) as scene:
        for py_name, b_name, room in (("amy", "zed", "r6a"), ("zara", "ben", "r6b")):
            obs = scene.observe(room)
            t = time.time()
            try:
                r = await scene.pair(py_name, b_name, room, fake_mdns=True, timeout=25)
                await chat_both_ways(scene, r["py"], r["key"], b_name, "mdns")
                res = {"connected": True} | {k: v for k, v in r.items() if k.endswith("_s")}
            except (TimeoutError, AssertionError) as exc:
                res = {"connected": False, "error": str(exc)[:300], "after_s": round(time.time() - t, 1)}
            res["browser_candidates"] = [c for c in obs.candidates(b_name) if c]
            res["offers"] = obs.offers()
            out["python_offers" if py_name < b_name else "browser_offers"] = res
    check(all(v["connected"] for v in out.values()), json.dumps(out))
    check(all(".local " in c for v in out.values() for c in v["browser_candidates"]), "candidates not mDNS")
    return out


async def scenario_call_declined(workdir: Path) -> dict:
    """A browser calls rtchat.py (as group calls do automatically): Python declines with endcall."""
    async with Scene(workdir) as scene:
        r = await scene.pair("fay", "gus", "r7")
        py, key, b = r["py"], r["key"], scene.browsers
        await b.call("call", key=key, to="fay")
        ended = await b.wait_event(lambda e: e.get("key") == key and e.get("event") == "callended", 15)
        check(ended.get("peer") == "fay", f"callended {ended}")
        check(not b.find(key, "page_error"), f"page errors {b.find(key, 'page_error')}")
        check(py.peer("gus") is not None and py.peer("gus").is_verified, "python still connected")
        await chat_both_ways(scene, py, key, "gus", "after-call")
        return {"endcall_seen": True, "page_errors": b.find(key, "page_error")}


async def scenario_timing(workdir: Path) -> dict:
    """Time from both running to chat-ready, browser<->browser vs browser<->rtchat.py."""
    out = {}
    async with Scene(workdir) as scene:
        b = scene.browsers
        s1, s2 = await asyncio.gather(b.start_peer("hal", "t1"), b.start_peer("ivy", "t1"))
        v1, v2 = await asyncio.gather(b.validated("hal", "ivy"), b.validated("ivy", "hal"))
        out["browser_browser_s"] = round(max(v1["ts"], v2["ts"]) - max(s1["t_start"], s2["t_start"]), 3)
        r = await scene.pair("jay", "kim", "t2")
        out["python_offers_s"] = r["ready_s"]
        r = await scene.pair("Nia", "lou", "t3")
        out["browser_offers_s"] = r["ready_s"]
        out["browser_offers_py_verified_s"] = r["py_verified_s"]
        out["browser_offers_browser_validated_s"] = r["browser_validated_s"]
        # the CLI as a user runs it: process start (imports, key load) included
        t_launch = time.time()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, str(PROJECT / "rtchat.py"), "pat", "--room", "t4", "--broker", scene.broker.tcp_url,
            "--state", str(workdir / "pat.json"), "--ice", "none", "--ice-host", "127.0.0.1", "--listen", "--json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            started = await b.start_peer("oz", "t4")
            t0 = max(t_launch, started["t_start"])
            t_join = None
            while t_join is None:
                line = await asyncio.wait_for(cli.stdout.readline(), 30)
                check(bool(line), "rtchat.py exited")
                if json.loads(line).get("type") == "join":
                    t_join = time.time()
            v = await b.validated("oz", "pat")
            out["cli_browser_offers_s"] = round(max(t_join, v["ts"]) - t0, 3)
            out["cli_process_to_verified_s"] = round(t_join - t_launch, 3)
        finally:
            cli.terminate()
            await cli.wait()
    return out


class Forger:
    """The keyless attacker of test_attacks.py: a paho client that sees every room and publishes any envelope
    under any name, plus its own aiortc peers that offer RTChat's 11 channels as the offerer does."""

    def __init__(self, rtchat, broker: Broker) -> None:
        import paho.mqtt.client as mqtt
        rtchat.restrict_ice_hosts(["127.0.0.1"])   # aioice never offers loopback on its own (as rtchat.py's ice_hosts)
        self.rtchat = rtchat
        self.loop = asyncio.get_running_loop()
        self.seen: list[tuple[float, str, dict]] = []      # (arrival, topic, envelope)
        self.pcs: list = []
        self._changed = asyncio.Event()
        self._subscribed = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mallory-{os.urandom(4).hex()}")
        self.client.on_message = lambda c, u, m: self.loop.call_soon_threadsafe(self._deliver, m.topic, m.payload)
        self.client.on_connect = lambda c, *a: c.subscribe("mrtchat/#")
        self.client.on_subscribe = lambda *a: setattr(self, "_subscribed", True)
        self.client.connect("127.0.0.1", broker.tcp)
        self.client.loop_start()

    async def ready(self) -> Forger:
        deadline = time.monotonic() + 5
        while not self._subscribed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        check(self._subscribed, "attacker could not subscribe")
        return self

    def _deliver(self, topic: str, payload: bytes) -> None:
        env = self.rtchat.decode_envelope(payload)
        if env:
            self.seen.append((time.time(), topic, env))
            self._changed.set()

    def publish(self, topic: str, sender: str, subtopic: str, data) -> None:
        env = {"sender": sender, "timestamp": self.rtchat.now_ms(), "subtopic": subtopic, "data": data}
        self.client.publish(topic, self.rtchat.encode_envelope(env))

    async def wait(self, pred, timeout: float) -> tuple[float, str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            for item in self.seen:
                if pred(*item):
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("attacker: nothing matching on the wire")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def user_info(self, topic: str, name: str, timeout: float = 10) -> dict:
        """What `name` announces publicly (userInfo with its public key), copied from its connect/offer."""
        def has_info(t, tp, e):
            if tp != topic or e["sender"] != name or not isinstance(e["data"], dict):
                return False
            return e["subtopic"] == "connect" or (e["subtopic"] == "RTCOffer" and "userInfo" in e["data"])
        _, _, env = await self.wait(has_info, timeout)
        info = env["data"] if env["subtopic"] == "connect" else env["data"]["userInfo"]
        return dict(info)

    async def attach(self, topic: str, target: str, name: str, info: dict, timeout: float = 6) -> dict:
        """Offer to `target` in `name`'s name with `info` (the victim's real public key); on an answer, add the
        target's trickled candidates, wait for the channels, send connectedViaRTC null as an offerer does."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.sdp import candidate_from_sdp
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        channels = {label: pc.createDataChannel(label) for label in self.rtchat.CHANNELS}
        await pc.setLocalDescription(await pc.createOffer())
        t0 = time.time()
        self.publish(topic, name, "RTCOffer", {"userInfo": info, "offer": {
            "localDescription": {"type": "offer", "sdp": pc.localDescription.sdp}, "target": target}})
        out = {"answered": False, "opened": False, "candidates_added": 0, "channels": channels}
        try:
            _, _, env = await self.wait(lambda t, tp, e: t >= t0 and (tp == topic or tp.startswith(topic + "/"))
                                        and e["sender"] == target and e["subtopic"] == "RTCAnswer"
                                        and isinstance(e["data"], dict) and e["data"].get("target") == name, timeout)
        except TimeoutError:
            return out
        out["answered"] = True
        await pc.setRemoteDescription(RTCSessionDescription(sdp=env["data"]["localDescription"]["sdp"], type="answer"))
        done = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(c.readyState == "open" for c in channels.values()):
            for t, tp, e in self.seen[done:]:
                c = e["data"]
                if t >= t0 and tp == topic and e["sender"] == target and e["subtopic"] == "RTCIceCandidate" \
                        and isinstance(c, dict) and " udp " in f" {str(c.get('candidate')).lower()} ":
                    with contextlib.suppress(Exception):
                        cand = candidate_from_sdp(c["candidate"].split(":", 1)[1])
                        cand.sdpMid, cand.sdpMLineIndex = c.get("sdpMid"), c.get("sdpMLineIndex")
                        await pc.addIceCandidate(cand)
                        out["candidates_added"] += 1
            done = len(self.seen)
            await asyncio.sleep(0.1)
        out["opened"] = all(c.readyState == "open" for c in channels.values())
        if out["opened"]:
            channels["connectedViaRTC"].send("null")
        return out

    async def close(self) -> None:
        for pc in self.pcs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5)
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


FORGED_CHATS = ["forged chat 1", "forged chat 2", "forged chat 3"]
FORGED_DMS = ["forged dm 1", "forged dm 2", "forged dm 3"]


def send_forged(rtchat, channels: dict, mixed: bool) -> int:
    """3 chats and 3 DMs as a browser sends them (JSON strings); `mixed`: the middle ones as rtchat.py frames."""
    sent = 0
    for i, (chat, dm) in enumerate(zip(FORGED_CHATS, FORGED_DMS, strict=True)):
        if mixed and i % 2:
            frames = [("chat", {"t": "msg", "id": rtchat.new_id(), "ts": rtchat.now_ms(), "text": chat,
                                "action": False, "sig": None}),
                      ("dm", {"t": "msg", "id": rtchat.new_id(), "ts": rtchat.now_ms(), "text": dm, "action": False})]
        else:
            frames = [("chat", chat), ("dm", dm)]
        for label, frame in frames:
            if channels[label].readyState == "open":
                channels[label].send(json.dumps(frame))
                sent += 1
    return sent


async def scenario_forgery_against_browser_peer(workdir: Path) -> dict:
    """Keyless attacker, issue text: a forged `unload` in bob's name disconnects alice from bob, and a forged
    RTCOffer in bob's name (bob's public key copied from his connect) followed by 3 chat and 3 DM frames is
    shown to alice as bob's words when alice is a browser (part A: recorded, not asserted). Part B: alice is
    rtchat.py, bob a browser on the legacy path: bob stays connected and verified, 0 of 3 forged chats and
    0 of 3 forged DMs are shown, and bob's real chat still arrives."""
    result: dict = {}
    async with Scene(workdir) as scene:
        rt, b = scene.rtchat, scene.browsers
        forger = await Forger(rt, scene.broker).ready()
        try:
            # ---- part A: two browsers ------------------------------------------------------------------------
            topic = "mrtchat/fa"
            await asyncio.gather(b.start_peer("alice", "fa", key="A-alice"), b.start_peer("bob", "fa", key="A-bob"))
            await asyncio.gather(b.validated("A-alice", "bob"), b.validated("A-bob", "alice"))
            bob_info = await forger.user_info(topic, "bob")
            t_unload = time.time()
            forger.publish(topic, "bob", "unload", "disconnecting")
            with contextlib.suppress(TimeoutError):
                await b.wait_event(lambda e: e.get("key") == "A-alice" and e.get("event") == "peer_disconnected"
                                   and e.get("peer") == "bob" and e.get("ts", 0) >= t_unload, 3)
            dropped = any(e.get("ts", 0) >= t_unload for e in b.find("A-alice", "peer_disconnected", peer="bob"))
            t_offer = time.time()
            try:                                  # part A only records what the browser does
                att = await forger.attach(topic, "alice", "bob", bob_info, timeout=8)
                att["error"] = None
            except Exception as exc:
                att = {"answered": None, "opened": False, "candidates_added": 0, "channels": {},
                       "error": f"{type(exc).__name__}: {exc}"[:200]}
            sent = send_forged(rt, att["channels"], mixed=False) if att["opened"] else 0
            await asyncio.sleep(1.5)
            a_chats, a_dms = (sum(1 for e in b.find("A-alice", kind, **{"from": "bob"})
                                  if str(e.get("text")).startswith("forged")) for kind in ("chat", "dm"))
            result["A_browser_alice"] = {
                "forged_unload_dropped_bob": dropped, "forged_offer_answered": att["answered"],
                "attacker_channels_open": att["opened"], "candidates_added": att["candidates_added"],
                "frames_sent": sent, "forged_chats_shown": f"{a_chats}/3", "forged_dms_shown": f"{a_dms}/3",
                "attack_error": att["error"], "prompts_for_forged_offer": len(
                    [e for e in b.find("A-alice", "dialog") if e.get("ts", 0) >= t_offer]),
                "bob_validated_again_after_forged_offer": any(
                    e.get("ts", 0) >= t_offer for e in b.find("A-alice", "peer_validated", peer="bob"))}
            for key in ("A-alice", "A-bob"):      # RTChat's MQTT client id is mrtchat+name: free the names
                with contextlib.suppress(Exception):
                    await b.call("close", key=key, timeout=15)
            await forger.close()
            forger = await Forger(rt, scene.broker).ready()

            # ---- part B: alice is rtchat.py, bob a browser -----------------------------------------------------
            topic = "mrtchat/fb"
            r = await scene.pair("alice", "bob", "fb", key="B-bob")
            py = r["py"]
            session = py.peer("bob")
            check(session is not None and session.is_verified, "python alice did not verify browser bob")
            bob_info = await forger.user_info(topic, "bob")
            t_unload = time.time()
            forger.publish(topic, "bob", "unload", "disconnecting")
            await asyncio.sleep(3.5)
            left = [a for t, e, a in py.events if e == "leave" and t >= t_unload]
            kept_after_unload = py.peer("bob") is session and session.is_verified and not left
            att = await forger.attach(topic, "alice", "bob", bob_info, timeout=5)
            sent = send_forged(rt, att["channels"], mixed=True) if att["opened"] else 0
            await asyncio.sleep(2.0)
            p_chats = sum(1 for _, e, a in py.events if e == "message" and a[0].text.startswith("forged"))
            p_dms = sum(1 for _, e, a in py.events if e == "dm" and a[0].text.startswith("forged"))
            left = [(a[0].name, a[1] if len(a) > 1 else None) for t, e, a in py.events
                    if e == "leave" and t >= t_unload]
            kept = py.peer("bob") is session and session.is_verified and not left
            await b.call("send", key="B-bob", text="real bob after the attack")
            _, _, (msg,) = await py.got("message", "real bob after the attack")
            b_ok = not [e for e in b.find("B-bob", "peer_disconnected", peer="alice") if e.get("ts", 0) >= t_unload]
            result["B_rtchat_py_alice"] = {
                "forged_unload_kept_bob": kept_after_unload, "forged_offer_answered": att["answered"],
                "attacker_channels_open": att["opened"], "frames_sent": sent,
                "forged_chats_shown": f"{p_chats}/3", "forged_dms_shown": f"{p_dms}/3",
                "bob_still_verified_same_session": kept, "leave_events": left,
                "browser_bob_kept_alice": b_ok, "real_chat_after_attack": f"{msg.sender} ({msg.trust})"}
            print(f"forgery: browser alice showed {a_chats}/3 forged chats, {a_dms}/3 forged DMs "
                  f"(unload dropped bob: {dropped}); rtchat.py alice showed {p_chats}/3, {p_dms}/3 "
                  f"(bob kept: {kept})")
            check(kept_after_unload, f"forged unload disconnected bob from rtchat.py: {result['B_rtchat_py_alice']}")
            check(p_chats == 0 and p_dms == 0, f"rtchat.py showed forged text: {result['B_rtchat_py_alice']}")
            check(kept and b_ok, f"bob's session did not survive: {result['B_rtchat_py_alice']}")
            check(msg.sender == "bob" and msg.trust == "legacy", f"real chat shown as {msg.sender}/{msg.trust}")
        finally:
            await forger.close()
    return result


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main(name: str) -> int:
    workdir = Path(tempfile.mkdtemp(prefix=f"rtchat-interop-{name}-"))
    os.chmod(workdir, 0o755)
    t = time.monotonic()
    try:
        result = asyncio.run(asyncio.wait_for(SCENARIOS[name](workdir), SCENARIO_TIMEOUT_S))
    except BaseException as exc:
        print(f"scenario {name} FAILED after {time.monotonic() - t:.1f} s: {type(exc).__name__}: {exc}")
        print(f"logs in {workdir}")
        with contextlib.suppress(Exception):
            print("driver stderr tail:", (workdir / "driver.err").read_text()[-3000:])
        return 1
    result["wall_s"] = round(time.monotonic() - t, 1)
    print("RESULT " + json.dumps({"scenario": name, **result}, default=str))
    if not os.environ.get("RTCHAT_INTEROP_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# =============================================================================
# pytest entry points
# =============================================================================

@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 30)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_browser_interop(name: str) -> None:
    run_scenario(name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
