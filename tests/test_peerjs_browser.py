"""The real peerjs-multichat page (headless Chromium) and rtchat.py's PeerJS classes in one mesh (issue 14).

Opt-in, like test_browser_interop.py. Needs, else each test is skipped with the reason printed:
  * MULTICHAT_SRC: a fetched git directory of github Rubilmax/peerjs-multichat (read at run time, never copied);
  * PJS_NODE_MODULES: npm peer@1.0.2, peerjs@1.2.0, vue@2.6.11, materialize-css@1.0.0;
  * a Python with Playwright (RTCHAT_HARNESS_PYTHON) and chromium (CHROMIUM_PATH or /usr/bin/chromium);
  * the harness: RTCHAT_PEERJS_HARNESS_DIR, default interop-peerjs beside $RTCHAT_HARNESS_DIR (the RTChat page's
    harness), else ../shared/interop-peerjs beside this project.

Loopback only: the harness's PeerServer listens on 127.0.0.1, Chromium gets no ICE servers and aborts every
non-local request, rtchat.py offers only 127.0.0.1 (and conftest puts this process in a namespace with only lo).
Each test prints `RESULT {json}` with its timings (run with -s to see them).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run
from support import ROOT, cli_env, rtchat_cmd

import rtchat

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "browser_driver_peerjs.py"
SHARED = Path(os.environ["RTCHAT_HARNESS_DIR"]).parent if os.environ.get("RTCHAT_HARNESS_DIR") else \
    HERE.parent.parent / "shared"
HARNESS_DIR = Path(os.environ.get("RTCHAT_PEERJS_HARNESS_DIR", SHARED / "interop-peerjs"))
PAGE_FILES = ("peerjs/dist/peerjs.min.js", "vue/dist/vue.js", "materialize-css/dist/js/materialize.min.js",
              "peer/package.json")


def missing_prerequisite() -> str | None:
    src = os.environ.get("MULTICHAT_SRC")
    if not src or not Path(src).exists():
        return "MULTICHAT_SRC (a fetched peerjs-multichat git directory) not set"
    node_modules = os.environ.get("PJS_NODE_MODULES")
    if not node_modules or not all((Path(node_modules) / f).is_file() for f in PAGE_FILES):
        return "PJS_NODE_MODULES (peer, peerjs@1.2.0, vue@2, materialize-css) not set"
    if not (HARNESS_DIR / "multichat_harness.py").is_file():
        return f"harness {HARNESS_DIR}/multichat_harness.py not found (set RTCHAT_PEERJS_HARNESS_DIR)"
    python = os.environ.get("RTCHAT_HARNESS_PYTHON")
    if not python or subprocess.run([python, "-c", "import playwright.async_api"], capture_output=True).returncode:
        return "no Python with Playwright (set RTCHAT_HARNESS_PYTHON)"
    if not os.path.exists(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")):
        return "chromium not found (set CHROMIUM_PATH)"
    if not shutil.which("node"):
        return "node not installed"
    return None


@pytest.fixture(scope="module")
def prerequisites():
    reason = missing_prerequisite()
    if reason:
        print(f"peerjs-multichat page tests skipped: {reason}")
        pytest.skip(f"peerjs-multichat page: {reason}")


def now_ms() -> float:
    return time.time() * 1000


class Pages:
    """The driver subprocess: real pages in one Chromium, on the harness's PeerServer."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.events: list[dict] = []
        self.port = 0
        self._changed = asyncio.Event()
        self._replies: dict[int, asyncio.Future] = {}
        self._next = 0

    async def __aenter__(self) -> Pages:
        self.proc = await asyncio.create_subprocess_exec(
            os.environ["RTCHAT_HARNESS_PYTHON"], str(DRIVER), "--harness", str(HARNESS_DIR),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=(self.workdir / "driver.err").open("wb"), limit=16 * 1024 * 1024)
        self._reader = asyncio.ensure_future(self._read())
        ready = await self.wait(lambda e: e.get("event") == "driver_ready", 60, "the driver")
        self.port = ready["port"]
        return self

    async def __aexit__(self, *exc_info) -> None:
        with contextlib.suppress(Exception):
            await self.call("quit", timeout=10)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()

    @property
    def server(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def _read(self) -> None:
        with (self.workdir / "driver.jsonl").open("w") as log:
            while line := await self.proc.stdout.readline():
                log.write(line.decode(errors="replace"))
                message = json.loads(line)
                future = self._replies.pop(message["reply"], None) if "reply" in message else None
                if future is not None and not future.done():
                    if message["ok"]:
                        future.set_result(message["result"])
                    else:
                        future.set_exception(RuntimeError(f"driver: {message['error']}\n{message.get('trace')}"))
                elif "event" in message:
                    self.events.append(message)
                    self._changed.set()

    async def call(self, cmd: str, timeout: float = 60, **fields):
        self._next += 1
        future = self._replies[self._next] = asyncio.get_running_loop().create_future()
        self.proc.stdin.write((json.dumps(dict(fields, id=self._next, cmd=cmd)) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(future, timeout)

    async def wait(self, predicate, timeout: float = 20, what: str = "an event") -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise AssertionError(f"no {what} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)

    def assert_no_errors(self) -> None:
        """The pages threw nothing and showed no error (a PeerJS "error" event becomes red text on the page)."""
        errors = [e for e in self.events if e.get("event") in ("page_exception", "page_error_text")]
        assert not errors, errors

    async def lists(self, user: str, *names: str, timeout: float = 20) -> dict:
        """Until the page of user lists every one of names as connected."""
        ids = [rtchat.PEERJS_ID_PREFIX + n for n in names]
        return await self.wait(lambda e: e.get("user") == user and e.get("event") == "peer_ids" and
                               all(i in e["peer_ids"] for i in ids), timeout, f"{user} listing {names}")

    async def shows(self, user: str, sender: str, text: str, timeout: float = 10) -> dict:
        """Until the page of user has the chat line in its chats."""
        return await self.wait(lambda e: e.get("user") == user and e.get("event") == "chat" and
                               e["chat"].get("sender") == sender and e["chat"].get("message") == text,
                               timeout, f"{user} showing {sender}: {text}")


class Terminal:
    """An rtchat.py PeerJS member, with what it heard."""

    def __init__(self, name: str, server: str) -> None:
        rtchat.restrict_ice_hosts(["127.0.0.1"])
        self.mesh = rtchat.PeerJSMesh(name, server=server, ice=rtchat.ice_configuration([]))
        self.chats: asyncio.Queue = asyncio.Queue()
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.mesh.on("chat", lambda chat: self.chats.put_nowait((chat, now_ms())))
        self.mesh.on("join", lambda name: self.joined.setdefault(name, now_ms()))
        self.mesh.on("leave", lambda name, reason: self.left.setdefault(name, now_ms()))

    async def __aenter__(self) -> rtchat.PeerJSMesh:
        await self.mesh.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.mesh.close()

    async def hears(self, sender: str, text: str, timeout: float = 10) -> float:
        """Until a chat line arrives; it must be this one. Returns when it came (epoch ms)."""
        chat, when = await asyncio.wait_for(self.chats.get(), timeout)
        assert (chat.sender, chat.text) == (sender, text)
        return when

    async def waits_for(self, predicate, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)


def result(name: str, **timings) -> None:
    print(f"RESULT {json.dumps(dict(test=name, **{k: round(v, 1) for k, v in timings.items()}))}")


def test_page_and_terminal_chat_both_ways(prerequisites, tmp_path):
    """The page dials the terminal; a line each way, with the page's format and an exact text."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            await pages.call("connect", user="amy", target="term")
            listed = await pages.lists("amy", "term")
            offered = await pages.wait(lambda e: e.get("event") == "sig_send" and '"OFFER"' in str(e.get("data")))
            await term.waits_for(lambda: "amy" in term.mesh.peers())
            text = "hi from the page \u00e9\U0001F30D <b>x</b>"
            await pages.call("say", user="amy", text=text)
            said = (await pages.wait(lambda e: e.get("event") == "click_send"))["t"]
            heard = await term.hears("amy", text)
            sent_at = now_ms()
            chat, sent = term.mesh.send_chat("hello from the terminal \u00e9")
            assert sent == ["amy"]
            shown = await pages.shows("amy", "term", "hello from the terminal \u00e9")
            assert shown["chat"]["timestamp"] == chat.timestamp
            state = await pages.call("state", user="amy")
            assert "term: hello from the terminal \u00e9" in state["lines"] and not state["error"]
            pages.assert_no_errors()
            result("page_and_terminal", page_offer_to_listed_ms=listed["t"] - offered["t"],
                   page_to_terminal_ms=heard - said, terminal_to_page_ms=shown["t"] - sent_at)
    run(scenario(), 120)


def test_terminal_dials_the_page(prerequisites, tmp_path):
    """The terminal dials a page: it answers, lists the terminal, and chat flows both ways."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            started = now_ms()
            await term.mesh.connect("amy")
            opened = now_ms()
            listed = await pages.lists("amy", "term")
            assert await term.mesh.wait_settled(10)
            term.mesh.send_chat("ping")
            await pages.shows("amy", "term", "ping")
            await pages.call("say", user="amy", text="pong")
            await term.hears("amy", "pong")
            pages.assert_no_errors()
            result("terminal_dials_page", connect_ms=opened - started, page_lists_terminal_ms=listed["t"] - started)
    run(scenario(), 120)


@pytest.mark.parametrize("through", ["amy", "bob"])
def test_terminal_joins_a_two_page_mesh(prerequisites, tmp_path, through):
    """bob's page connected to amy's; the terminal dials one of them and ends up connected to both, and each
    page shows the terminal's line, the terminal both pages' lines."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            await pages.call("open", user="bob")
            await pages.call("connect", user="bob", target="amy")
            await pages.lists("amy", "bob")
            await pages.lists("bob", "amy")
            started = now_ms()
            await term.mesh.connect(through)
            assert await term.mesh.wait_settled(20)
            merged = now_ms()
            assert sorted(term.mesh.peers()) == ["amy", "bob"]
            for page in ("amy", "bob"):
                await pages.lists(page, "term")
            term.mesh.send_chat("hello mesh")
            for page in ("amy", "bob"):
                await pages.shows(page, "term", "hello mesh")
            await pages.call("say", user="amy", text="from amy")
            await term.hears("amy", "from amy")
            await pages.call("say", user="bob", text="from bob")
            await term.hears("bob", "from bob")
            pages.assert_no_errors()
            result(f"terminal_joins_through_{through}", merged_ms=merged - started)
    run(scenario(), 150)


def test_page_joins_through_the_terminal(prerequisites, tmp_path):
    """amy's page is connected to the terminal; bob's page dials the terminal and merges with amy."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            await pages.call("open", user="bob")
            await term.mesh.connect("amy")
            await pages.lists("amy", "term")
            await pages.call("connect", user="bob", target="term")
            await pages.lists("bob", "term", "amy")
            await pages.lists("amy", "term", "bob")
            await pages.call("say", user="bob", text="bob here")
            await pages.shows("amy", "bob", "bob here")
            await term.hears("bob", "bob here")
            pages.assert_no_errors()
    run(scenario(), 150)


def test_page_and_terminal_dialling_each_other_at_once(prerequisites, tmp_path):
    """A merge race: two connections between one pair. The terminal holds the page's ANSWER to its own dial until
    the page has dialled it too, so the race happens every time; every line then arrives once each way."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            held: list = []
            deliver = term.mesh._on_signal   # the race is made by delaying one message on its way in
            term.mesh.signaling.off("signal", deliver)
            term.mesh.signaling.on("signal", lambda s: held.append(s) if s.kind == "ANSWER" and held is not None
                                   else deliver(s))
            dialling = asyncio.ensure_future(term.mesh.connect("amy"))
            await term.waits_for(lambda: held)
            await pages.call("connect", user="amy", target="term")
            await term.waits_for(lambda: len(term.mesh.connections) == 2)
            for signal in held:
                deliver(signal)
            held = None
            await dialling
            await pages.lists("amy", "term")
            await term.waits_for(lambda: [c.state for c in term.mesh.connections.values()] == ["open", "open"])
            for n in range(3):
                term.mesh.send_chat(f"line {n}")
                await pages.shows("amy", "term", f"line {n}")
                await pages.call("say", user="amy", text=f"reply {n}")
                await term.hears("amy", f"reply {n}")
            state = await pages.call("state", user="amy")
            assert [line for line in state["lines"] if line.startswith("term: ")] == \
                [f"term: line {n}" for n in range(3)]
            assert term.chats.empty()
            pages.assert_no_errors()
    run(scenario(), 120)


def test_a_closed_tab_is_seen_leaving(prerequisites, tmp_path):
    """A page closing its tab says nothing: the terminal notices from ICE consent, within about ten seconds."""
    async def scenario():
        async with Pages(tmp_path) as pages, Terminal("term", pages.server) as term:
            await pages.call("open", user="amy")
            await term.mesh.connect("amy")
            await pages.lists("amy", "term")
            closed = now_ms()
            await pages.call("close", user="amy")
            await term.waits_for(lambda: "amy" in term.left, timeout=20)
            assert term.mesh.peers() == []
            pages.assert_no_errors()
            result("closed_tab", seen_leaving_ms=term.left["amy"] - closed)
    run(scenario(), 120)


def test_command_line_pipe_and_listener_with_two_pages(prerequisites, tmp_path):
    """`echo … | rtchat.py ci --peerjs URL --connect amy` reaches amy and bob (bob is in amy's mesh) and exits 0;
    `rtchat.py bot --peerjs URL --connect bob --listen --count 1` prints what amy's page says."""
    async def scenario():
        async with Pages(tmp_path) as pages:
            def env(name: str) -> dict:  # no broker: --peerjs alone uses none; a key of its own
                return cli_env("mqtt://127.0.0.1:9", RTCHAT_STATE=str(tmp_path / f"{name}.json"))
            await pages.call("open", user="amy")
            await pages.call("open", user="bob")
            await pages.call("connect", user="bob", target="amy")
            await pages.lists("amy", "bob")
            started = now_ms()
            sent = await asyncio.create_subprocess_exec(
                *rtchat_cmd("ci", "--peerjs", pages.server, "--connect", "amy"), env=env("ci"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await sent.communicate("deployed \u00e9\n".encode())
            assert sent.returncode == 0, err.decode()
            assert out == b"" and "to 2 peer(s): amy, bob" in err.decode()
            for page in ("amy", "bob"):
                shown = await pages.shows(page, "ci", "deployed \u00e9")
            listener = await asyncio.create_subprocess_exec(
                *rtchat_cmd("bot", "--peerjs", pages.server, "--connect", "bob", "--listen", "--count", "1"),
                env=env("bot"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            while not (await asyncio.wait_for(listener.stderr.readline(), 60)).startswith(b"--> amy"):
                pass  # through bob's mesh: the page says its line only to those it is connected to
            await pages.call("say", user="amy", text="from amy's page")
            out, _ = await asyncio.wait_for(listener.communicate(), 30)
            assert listener.returncode == 0 and out.decode() == "amy: from amy's page\n"
            pages.assert_no_errors()
            result("command_line_with_pages", pipe_start_to_shown_ms=shown["t"] - started)
    run(scenario(), 150)


def test_the_bridge_carries_a_page_and_a_room(prerequisites, broker, tmp_path):
    """contrib/bridge.py between #ops (rtchat.py on mosquitto) and amy's page: a room line appears on the page,
    marked; the page's line appears in the room, marked; neither comes back."""
    async def scenario():
        async with Pages(tmp_path) as pages:
            def env(name: str) -> dict:
                return cli_env(broker.url, RTCHAT_STATE=str(tmp_path / f"{name}.json"))
            await pages.call("open", user="amy")
            bridge = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "contrib" / "bridge.py"), "relay", "--room", "ops", "--peerjs",
                pages.server, "--connect", "amy", env=env("relay"), stderr=asyncio.subprocess.PIPE)
            try:
                assert b"bridging #ops" in await asyncio.wait_for(bridge.stderr.readline(), 60)
                await pages.lists("amy", "relay")
                listener = await asyncio.create_subprocess_exec(
                    *rtchat_cmd("carol", "--room", "ops", "--listen", "--count", "1"), env=env("carol"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                while b"listening in #ops" not in await asyncio.wait_for(listener.stderr.readline(), 60):
                    pass
                said = await asyncio.create_subprocess_exec(
                    *rtchat_cmd("dave", "--room", "ops", "--wait-peers", "2"), env=env("dave"),
                    stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                _, err = await said.communicate(b"from the room\n")
                assert said.returncode == 0, err.decode()
                await pages.shows("amy", "relay", "[via #ops] dave: from the room")
                await pages.call("say", user="amy", text="from the page")
                out, _ = await asyncio.wait_for(listener.communicate(), 30)
                assert out.decode() == "dave: from the room\n"  # carol's --count 1: dave's own line first
                late = await asyncio.create_subprocess_exec(
                    *rtchat_cmd("erin", "--room", "ops", "--listen", "--json", "--count", "1"), env=env("erin"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                while True:  # once the relay is verified, what it says reaches erin as news
                    event = json.loads(await asyncio.wait_for(late.stdout.readline(), 60))
                    if (event["type"], event["from"]) == ("join", "relay"):
                        break
                await pages.call("say", user="amy", text="again from the page")
                out, _ = await asyncio.wait_for(late.communicate(), 30)
                messages = [json.loads(line) for line in out.decode().splitlines()]
                assert [(m["from"], m["text"]) for m in messages if m["type"] == "message"] == \
                    [("relay", "[via peerjs] amy: again from the page")]
                state = await pages.call("state", user="amy")
                assert not any("[via peerjs]" in line for line in state["lines"])  # nothing came back
                pages.assert_no_errors()
            finally:
                bridge.terminate()
                assert await bridge.wait() == 130
    run(scenario(), 180)


def test_the_interactive_chat_and_a_page_chat_both_ways(prerequisites, tmp_path):
    """`rtchat.py term --peerjs URL --connect amy` at a terminal (a pseudo-terminal read through a terminal
    emulator): amy's page lists it, her lines show marked as unverified, the terminal's lines and actions show on
    her page, and the page shows no error (it ignores what rtchat.py peers add to their OFFERs); bob's page dials
    the terminal and meets amy through it."""
    from test_screen import Terminal as Screen

    async def scenario():
        async with Pages(tmp_path) as pages:
            await pages.call("open", user="amy")
            started = now_ms()
            screen = Screen(["term", "--peerjs", pages.server, "--connect", "amy", "--state",
                             str(tmp_path / "term.json")], cli_env("mqtt://127.0.0.1:9", TERM="xterm"), 100, 30)
            try:
                await screen.wait_for_text("--> amy? joined (unverified", 60)
                joined = now_ms()
                await screen.wait(lambda: "[peerjs]" in screen.prompt_row(), "the prompt")
                listed = await pages.lists("amy", "term")
                text = "hi from the page \u00e9"
                await pages.call("say", user="amy", text=text)
                said = (await pages.wait(lambda e: e.get("event") == "click_send"))["t"]
                await screen.wait(lambda: any(row.endswith(f"<amy?> {text}") for row in screen.rows()), "amy's line")
                heard = now_ms()
                typed = now_ms()
                screen.type("hello from the terminal\r")
                shown = await pages.shows("amy", "term", "hello from the terminal")
                screen.type("/me waves\r")
                await pages.shows("amy", "term", "* term waves")
                state = await pages.call("state", user="amy")
                assert "term: hello from the terminal" in state["lines"] and not state["error"]
                await pages.call("open", user="bob")   # a page joins through the terminal: it meets amy too
                await pages.call("connect", user="bob", target="term")
                await screen.wait_for_text("--> bob? joined")
                await pages.lists("bob", "term", "amy")
                await pages.call("say", user="bob", text="hello both")
                await screen.wait(lambda: any(row.endswith("<bob?> hello both") for row in screen.rows()), "bob")
                await pages.shows("amy", "bob", "hello both")
                pages.assert_no_errors()
                screen.type("\x04")
                assert await screen.exit_code() == 0
                result("interactive_chat_and_page", start_to_joined_ms=joined - started,
                       page_lists_terminal_ms=listed["t"] - started, page_to_terminal_ms=heard - said,
                       terminal_to_page_ms=shown["t"] - typed)
            finally:
                screen.close()
    run(scenario(), 150)
