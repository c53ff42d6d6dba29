"""The interactive chat as a person sees it: rtchat.py in a pseudo-terminal, its output fed to a terminal emulator
(pyte), peers sending while someone types. Every assertion is about the emulated screen."""
import asyncio
import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import sys
import termios
import time

import pyte
import pytest
from support import cli_env, make_client, rtchat_cmd, run

import rtchat

MESSAGE_ROW = re.compile(r"^\d\d:\d\d <(\w+)> (.*)$")


class Terminal:
    """rtchat.py on a pty of cols x rows; what it writes goes through pyte, which answers its cursor queries."""

    def __init__(self, args: list[str], env: dict, cols: int = 80, rows: int = 24, cwd=None) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.bells = 0
        self.screen.bell = self._bell  # before the stream looks up the screen's handlers
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal's size is set before rtchat.py looks at it
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            if cwd:
                os.chdir(cwd)
            os.execve(sys.executable, rtchat_cmd(*args), env)
        self.screen.write_process_input = lambda text: os.write(self.fd, text.encode())
        self.closed = False
        self.changed = asyncio.Event()  # set whenever output comes, and at its end
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _bell(self, *args) -> None:
        self.bells += 1

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.closed = True
        else:
            self.stream.feed(data)
        self.changed.set()

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.rows())

    def lines(self) -> list[str]:
        """The rows, with rows cut to the width (indented) joined back to the line they continue."""
        return re.sub(r"\n +", " ", self.text()).split("\n")

    def type(self, keys: str | bytes) -> None:
        os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)

    async def wait(self, predicate, what: str, timeout: float = 30.0) -> None:
        """Until predicate() holds for the screen (checked as output comes), at most timeout seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.text()}") from None

    async def wait_for_text(self, text: str, timeout: float = 30.0) -> None:
        await self.wait(lambda: text in self.text(), repr(text), timeout)

    def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(rows, cols)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.kill(self.pid, signal.SIGWINCH)

    def toolbar_rows(self) -> list[str]:
        return [row for row in self.rows() if " verified of " in row or "no room (/join" in row]

    def toolbar(self) -> str:
        """The status bar, or "" while there is not exactly one."""
        rows = self.toolbar_rows()
        return rows[0] if len(rows) == 1 else ""

    def prompt_row(self) -> str:
        """The row the cursor is on: where the draft is."""
        return self.rows()[self.screen.cursor.y]

    async def exit_code(self, timeout: float = 30.0) -> int:
        """Once rtchat.py has exited (its end of the terminal closes then), its exit code."""
        try:
            await self.wait(lambda: self.closed, "the end of the output", timeout)
        except AssertionError:
            raise AssertionError(f"rtchat.py did not exit; the screen:\n{self.text()}") from None
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.fd)
        if self.pid:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextlib.asynccontextmanager
async def chat(tmp_path, broker, name="alice", room="vis", cols=80, rows=24, extra=(), state=None, cwd=None,
               **env):
    term = Terminal([name, "--room", room, "--state", str(state or tmp_path / f"{name}.json"), *extra],
                    cli_env(broker.url, TERM="xterm", **env), cols, rows, cwd)
    try:
        await term.wait(lambda: f"[{room}]" in term.prompt_row(), "the prompt")
        yield term
    finally:
        term.close()


async def peers_in(tmp_path, broker, room, *names, **options):
    clients = [await make_client(name, tmp_path, broker.url, **options).start() for name in names]
    rooms = [await client.join(room) for client in clients]
    return clients, rooms


def message_rows(term) -> list[tuple[str, str]]:
    return [match.groups() for row in term.rows() if (match := MESSAGE_ROW.match(row))]


@pytest.mark.parametrize("cols, rows", [(80, 24), (40, 24)])
def test_a_draft_survives_two_peers_talking(broker, tmp_path, cols, rows):
    """Issue 11, problem 1: lines from others go above the prompt, the draft stays on its row, one status bar."""
    async def scenario():
        async with chat(tmp_path, broker, cols=cols, rows=rows) as term:
            clients, (rb, rc) = await peers_in(tmp_path, broker, "vis", "bob", "carol")
            await asyncio.gather(rb.wait_for_peers(2, 20), rc.wait_for_peers(2, 20))
            await term.wait(lambda: "bob joined" in term.text() and "carol joined" in term.text(), "the join lines")
            term.type("draft number 3")
            await term.wait(lambda: term.prompt_row() == "[vis] draft number 3", "the draft")
            said = []
            for n in range(3):
                for room, who in ((rb, "bob"), (rc, "carol")):
                    room.send(f"{who} says {n}")
                    said.append((who, f"{who} says {n}"))
            # each peer's lines in the order it said them; how the two interleave is up to the network
            await term.wait(lambda: sorted(message_rows(term)) == sorted(said) and term.prompt_row() ==
                            "[vis] draft number 3" and len(term.toolbar_rows()) == 1,
                            "every message on a row of its own, the draft, the status bar")
            for who in ("bob", "carol"):
                assert [row for row in message_rows(term) if row[0] == who] == [row for row in said if row[0] == who]
            assert [row for row in term.rows() if "draft" in row] == ["[vis] draft number 3"]
            assert term.toolbar().startswith(" #vis: 2 verified of 2 seen")
            below = term.rows()[term.screen.cursor.y + 1:]
            assert below[-1] == term.toolbar() and not any(below[:-1])  # the status bar at the bottom
            received = []
            rb.on("message", received.append)
            term.type("\r")
            await term.wait(lambda: ("alice", "draft number 3") in message_rows(term), "the sent line")
            await term.wait(lambda: term.prompt_row() == "[vis]", "an empty prompt")
            for client in clients:
                await client.close()
            await term.wait(lambda: "0 verified of 0 seen" in term.text(), "the status bar to follow")
            assert len(term.toolbar_rows()) == 1
            term.type("\x04")
            assert await term.exit_code() == 0
    run(scenario(), 90)


def test_a_resize_keeps_the_screen_whole(broker, tmp_path):
    async def scenario():
        async with chat(tmp_path, broker) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob")
            await rb.wait_for_peers(1, 20)
            await term.wait_for_text("bob joined")
            term.type("a draft")
            await term.wait(lambda: term.prompt_row() == "[vis] a draft", "the draft")
            term.resize(50, 30)
            await term.wait(lambda: term.prompt_row() == "[vis] a draft" and len(term.toolbar_rows()) == 1,
                            "the prompt and one status bar after the resize")
            rb.send("word " * 14)
            await term.wait(lambda: ("bob", "word " * 6 + "word") in [(w, t.rstrip()) for w, t in message_rows(term)]
                            and term.prompt_row() == "[vis] a draft" and len(term.toolbar_rows()) == 1,
                            "the message cut to 50 columns, then the prompt and one status bar again")
            rows = term.rows()
            first = next(i for i, row in enumerate(rows) if MESSAGE_ROW.match(row) and "word" in row)
            assert rows[first + 1].startswith(" " * 12 + "word") and all(len(row) <= 50 for row in rows)
            await clients[0].close()
    run(scenario(), 90)


def test_ask_does_not_hold_up_typing(broker, tmp_path):
    """Problem 2: a line typed while /ask waits goes out at once (here the answer waits for that line)."""
    async def scenario():
        async with chat(tmp_path, broker) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob")
            typed = asyncio.Event()
            rb.on("message", lambda msg: msg.text == "typed while waiting" and typed.set())

            async def slow(question):
                await asyncio.wait_for(typed.wait(), rtchat.ASK_TIMEOUT_S - 1)
                return "got it"
            clients[0].questions["slow"] = slow
            await rb.wait_for_peers(1, 20)
            await term.wait_for_text("bob joined")
            term.type("/ask bob slow\r")
            await term.wait_for_text("asking bob: slow")
            term.type("typed while waiting\r")
            await term.wait_for_text("bob answers: got it")
            assert ("alice", "typed while waiting") in message_rows(term)
            await clients[0].close()
    run(scenario(), 90)


BROKEN_PLUGIN = '''
from rtchat import on, question

@question("boom")
def boom(ctx, q):
    raise ValueError("no dice")

@question("crash")
async def crash(ctx, q):
    raise RuntimeError("deep down")

@on("join")
def greet(ctx, peer):
    raise RuntimeError("hook broke")
'''


def test_failing_handlers_are_one_line_and_the_asker_hears_at_once(broker, tmp_path):
    """Problem 3: question handlers and hooks that raise: one line each, no traceback, an error answer at once."""
    async def scenario():
        (tmp_path / "plugins").mkdir()
        (tmp_path / "plugins" / "broken.py").write_text(BROKEN_PLUGIN)
        async with chat(tmp_path, broker, RTCHAT_PLUGINS=str(tmp_path / "plugins")) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob")
            await rb.wait_for_peers(1, 20)
            await term.wait_for_text("@on('join') in broken failed: RuntimeError: hook broke (see --debug)")
            with pytest.raises(rtchat.AskError, match="boom failed: ValueError"):
                await rb.ask("alice", "boom")
            with pytest.raises(rtchat.AskError, match="crash failed: RuntimeError"):
                await rb.ask("alice", "crash")
            await term.wait_for_text("RuntimeError: deep down (see --debug)")
            lines = [line for line in term.lines() if "failed" in line]
            assert len(lines) == 3
            assert "question 'boom' (broken; they were told) failed: ValueError: no dice" in lines[1]
            assert "Traceback" not in term.text() and "UnboundLocalError" not in term.text()
            await clients[0].close()
    run(scenario(), 90)


def test_a_bad_join_is_an_error_and_you_stay(broker, tmp_path):
    """Problem 4: /join with a bad argument says why and leaves you where you were."""
    async def scenario():
        async with chat(tmp_path, broker) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob")
            await rb.wait_for_peers(1, 20)
            for line, why in (("/join #", "1 to 200 characters"), ("/join bad room name", "one word"),
                              ("/join " + "x" * 201, "1 to 200 characters"), ("/join a+b", "cannot contain")):
                term.type(line + "\r")
                await term.wait(lambda why=why: why in term.text() and term.prompt_row() == "[vis]",
                                f"{why!r}, still in #vis")
                term.type("/clear\r")
                await term.wait(lambda why=why: why not in term.text(), "a clear screen")
            received = []
            rb.on("message", received.append)
            term.type("still here\r")
            await term.wait(lambda: [m.text for m in received] == ["still here"], "the line to reach bob in #vis")
            await clients[0].close()
    run(scenario(), 90)


def test_ctrl_c_clears_the_line_and_a_second_one_leaves(broker, tmp_path):
    """Problem 5."""
    async def scenario():
        async with chat(tmp_path, broker) as term:
            term.type("half a thought")
            await term.wait(lambda: term.prompt_row() == "[vis] half a thought", "the draft")
            term.type("\x03")
            await term.wait(lambda: term.prompt_row() == "[vis]", "the line cleared")
            assert os.waitpid(term.pid, os.WNOHANG) == (0, 0)
            term.type("\x03")
            assert await term.exit_code() == 0
        async with chat(tmp_path, broker) as term:  # Ctrl-C on an empty line first only tells how to leave
            term.type("\x03")
            await term.wait_for_text("Ctrl-C again")
            term.type("x\x7f")
            await term.wait(lambda: term.prompt_row() == "[vis]", "the prompt")
            assert os.waitpid(term.pid, os.WNOHANG) == (0, 0)
            term.type("/quit\r")
            assert await term.exit_code() == 0
    run(scenario(), 90)


def test_a_changed_key_is_explained_on_both_sides_and_trust_takes_the_next(broker, tmp_path):
    """Problem 6: carol comes back with a new key. alice is told what to type, carol why she cannot connect;
    /trust carol accepts the key she proves next."""
    async def scenario():
        async with chat(tmp_path, broker) as alice:
            async with chat(tmp_path, broker, name="carol") as carol:
                await alice.wait_for_text("carol joined")
                carol.type("/quit\r")
                assert await carol.exit_code() == 0
            (tmp_path / "new").mkdir()
            async with chat(tmp_path, broker, name="carol", state=tmp_path / "new" / "carol.json") as carol:
                await alice.wait_for_text("carol has a DIFFERENT KEY")
                assert any("/trust carol accepts the key they prove next" in line for line in alice.lines())
                await carol.wait_for_text("alice refuses your key")
                # carol has lost what she knew of alice with her old key: she cannot tell this hint from a forgery
                assert any("ask them to type /trust carol (unconfirmed" in line for line in carol.lines())
                alice.type("/trust carol\r")
                await alice.wait_for_text("is now pinned to its new key")
                await carol.wait_for_text("alice joined (verified, channel-bound)")
            new = rtchat.Store(tmp_path / "new" / "carol.json").load()["identity"]["public_key"]
            pins = rtchat.Store(tmp_path / "alice.json").load()["pins"]
            assert [fp for fp, pin in pins.items() if "carol" in pin["names"]] == [rtchat.fingerprint(new)]
    run(scenario(), 120)


def test_whois_says_when_a_peer_is_not_verified(broker, tmp_path):
    """Problem 6: a key that was only announced gets no safety number."""
    async def scenario():
        async with chat(tmp_path, broker) as term:
            mallory = rtchat.Identity.generate()
            signaling = rtchat.Signaling(broker.url)
            await signaling.connect()
            envelope = {"sender": "mallory", "timestamp": rtchat.now_ms(), "subtopic": "connect",
                        "data": {"publicKeyString": mallory.public_key_string}, "nonce": rtchat.new_id()}
            signed = rtchat.signed_bytes(
                "signaling", rtchat.topic_for("vis"), "mallory", "connect", envelope["timestamp"], envelope["nonce"],
                envelope["data"])
            envelope["sig"] = __import__("base64").b64encode(mallory.sign(signed)).decode()
            signaling.publish(rtchat.topic_for("vis"), rtchat.encode_envelope(envelope))
            await term.wait(lambda: "1 seen" in term.toolbar(), "mallory seen")
            term.type("/whois mallory\r")
            await term.wait_for_text("NOT VERIFIED")
            assert rtchat.show_fingerprint(mallory.fingerprint) in term.text()
            assert "safety number  " not in term.text()
            await signaling.close()
    run(scenario(), 90)


def test_file_progress_on_both_sides(broker, tmp_path):
    """Problem 7: a progress line that updates in place while a file goes out, and the receiver hears of the file
    when it starts."""
    async def scenario():
        data = os.urandom(24 * 1024 * 1024)
        (tmp_path / "big.bin").write_bytes(data)
        async with chat(tmp_path, broker, extra=("--files", str(tmp_path / "alice-files"))) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob", files=tmp_path / "bob-files")
            await rb.wait_for_peers(1, 20)
            await term.wait_for_text("bob joined")
            most = 0

            def progress(row_start: str) -> bool:
                nonlocal most
                rows = [row for row in term.rows() if row.startswith(row_start)]
                most = max(most, len(rows))
                return any(re.search(r"\(\d\d?%\), .*/s, \d+ s left", row) for row in rows)
            term.type(f"/send bob {tmp_path / 'big.bin'}\r")
            await term.wait(lambda: progress("-!- sending big.bin to bob: "), "a progress line")
            await term.wait(lambda: not progress("-!- sending big.bin to bob: ") and "bob has" in term.text(),
                            "the end of the transfer")
            assert most == 1 and not [row for row in term.rows() if row.startswith("-!- sending big.bin to bob: ")]
            assert (tmp_path / "bob-files" / "big.bin").read_bytes() == data
            most = 0
            sending = asyncio.ensure_future(rb.send_file("alice", tmp_path / "big.bin"))
            await term.wait_for_text("bob is sending you big.bin (25.2 MB)")
            await term.wait(lambda: progress("-!- receiving big.bin from bob: "), "a progress line")
            await sending
            await term.wait_for_text("sent big.bin (25.2 MB), saved as")
            assert most == 1 and not [row for row in term.rows() if row.startswith("-!- receiving big.bin")]
            await clients[0].close()
    run(scenario(), 120)


def test_no_message_can_pass_for_another_or_flood_the_screen(broker, tmp_path):
    """Issue 12, item 10: sender and trust mark on the first row, other rows indented, at most 12 rows each."""
    async def scenario():
        async with chat(tmp_path, broker) as term:
            clients, (rb,) = await peers_in(tmp_path, broker, "vis", "bob")
            await rb.wait_for_peers(1, 20)
            await term.wait_for_text("bob joined")
            rb.send("\n" * 16000 + "end")
            await term.wait_for_text("more characters]")
            assert "bob joined" in term.text()  # one message did not scroll the screen away
            rows = term.rows()
            start = next(i for i, row in enumerate(rows) if re.match(r"^\d\d:\d\d <bob>$", row))
            assert rows[start + rtchat.MAX_SHOWN_ROWS - 1].strip() == f"[... {16003 - 10} more characters]"
            term.type("/clear\r")
            await term.wait(lambda: "bob joined" not in term.text(), "a clear screen")
            rb.send("hi" + " " * 75 + "12:01 <carol> I resign")
            fake = rtchat.Message(id="", room="vis", sender="carol", text="fine\n" * 40 + "12:02 <carol> and this",
                                  ts=rtchat.now_ms(), salt=rtchat.new_id())
            fake.id = fake.bound_id()   # an unsigned relay is taken only under the id its words give it
            rb.peers["alice"].send("chat", {"t": "backfill", "authors": {}, "msgs": [
                {"id": fake.id, "from": "carol", "text": fake.text, "ts": fake.ts, "fingerprint": None,
                 "salt": fake.salt}]})
            await term.wait(lambda: "(via bob, unverified)" in term.text() and "I resign" in term.text(),
                            "both messages")
            rows = term.rows()
            assert [row[:30] for row in rows if MESSAGE_ROW.match(row)] == [
                row[:30] for row in rows if re.match(r"^\d\d:\d\d ", row)]
            senders = [MESSAGE_ROW.match(row).group(1) for row in rows if MESSAGE_ROW.match(row)]
            assert senders == ["bob", "carol"]
            carol = next(row for row in rows if re.match(r"^\d\d:\d\d <carol>", row))
            assert re.match(r"^\d\d:\d\d <carol> \(via bob, unverified\) fine$", carol)
            assert sum(1 for row in rows if row.strip() == "fine") == rtchat.MAX_SHOWN_ROWS - 2
            assert all(row.startswith(" ") or not row.lstrip().startswith(("12:0", "fine")) for row in rows
                       if not MESSAGE_ROW.match(row))
            await clients[0].close()
    run(scenario(), 90)


def test_several_rooms_mentions_and_rooms_rejoined(broker, tmp_path):
    """Rooms side by side: /join adds and switches, unread counts in the status bar (a mention stands out and
    rings), other rooms' lines carry their room, Alt-1 and /switch move, and the rooms come back on restart."""
    async def scenario():
        clients, (bob_vis,) = await peers_in(tmp_path, broker, "vis", "bob")
        bob_ops = await clients[0].join("ops")
        async with chat(tmp_path, broker, extra=("--color", "always")) as term:
            await bob_vis.wait_for_peers(1, 20)
            term.type("/join ops\r")
            await term.wait(lambda: term.prompt_row() == "[ops]", "the prompt of #ops")
            await bob_ops.wait_for_peers(1, 20)
            bob_vis.send("over in vis")
            bob_vis.send("hey alice, look")
            await term.wait(lambda: "1:#vis 2!" in term.toolbar(), "the unread count, with a mention")
            rows = term.rows()
            assert any(re.match(r"^#vis \d\d:\d\d <bob> over in vis$", row) for row in rows)
            mention = next(i for i, row in enumerate(rows) if row.endswith("hey alice, look"))
            assert term.screen.buffer[mention][len(rows[mention]) - 1].bold and term.bells == 1
            bar = term.rows().index(term.toolbar())
            column = term.toolbar().index("1:#vis")
            assert term.screen.buffer[bar][column].bold and term.screen.buffer[bar][column].underscore
            bob_ops.send("here in ops")
            await term.wait(lambda: any(re.match(r"^\d\d:\d\d <bob> here in ops$", row) for row in term.rows()),
                            "a line of the current room, without its room")
            term.type("\x1b1")
            await term.wait(lambda: term.prompt_row() == "[vis]" and "#vis: 1 verified" in term.toolbar()
                            and "#ops" not in term.toolbar(), "Alt-1: #vis, nothing unread")
            term.type("/switch ops\r")
            await term.wait(lambda: term.prompt_row() == "[ops]", "/switch")
            term.type("\x0e")  # Ctrl-N
            await term.wait(lambda: term.prompt_row() == "[vis]", "Ctrl-N")
            term.type("\x04")
            assert await term.exit_code() == 0
        async with chat(tmp_path, broker, room="ops", extra=("--no-bell",)) as term:
            await term.wait(lambda: "joined #vis" in term.text() and "joined #ops" in term.text(), "both rooms")
            await asyncio.gather(bob_vis.wait_for_peers(1, 20), bob_ops.wait_for_peers(1, 20))
            bob_vis.send("alice: again")
            await term.wait(lambda: "1:#vis 1!" in term.toolbar(), "the mention counted")
            assert term.bells == 0 and term.prompt_row() == "[ops]"
            term.type("/part\r")
            await term.wait(lambda: term.prompt_row() == "[vis]", "back in #vis after /part")
            term.type("\x04")
            assert await term.exit_code() == 0
        for client in clients:
            await client.close()
        rooms = rtchat.Store(tmp_path / "alice.json").load()["rooms"]
        assert rooms["vis"]["open"] and not rooms["ops"]["open"]
    run(scenario(), 120)


def test_completion_of_paths_and_help_topics(broker, tmp_path):
    async def scenario():
        (tmp_path / "report-2024.pdf").write_text("numbers")
        async with chat(tmp_path, broker, cwd=tmp_path) as term:
            term.type("/help lastl\t")
            await term.wait(lambda: term.prompt_row() == "[vis] /help lastlog", "/help completed")
            term.type("\x03/send bob rep\t")
            await term.wait(lambda: term.prompt_row() == "[vis] /send bob report-2024.pdf", "the path completed")
    run(scenario(), 60)
