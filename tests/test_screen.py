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
from conftest import cli_env, make_client, rtchat_cmd, run

import rtchat

MESSAGE_ROW = re.compile(r"^\d\d:\d\d <(\w+)> (.*)$")


class Terminal:
    """rtchat.py on a pty of cols x rows; what it writes goes through pyte, which answers its cursor queries."""

    def __init__(self, args: list[str], env: dict, cols: int = 80, rows: int = 24) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal's size is set before rtchat.py looks at it
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execve(sys.executable, rtchat_cmd(*args), env)
        self.screen.write_process_input = lambda text: os.write(self.fd, text.encode())
        self.closed = False
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.closed = True
            return
        self.stream.feed(data)

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.rows())

    def type(self, keys: str | bytes) -> None:
        os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)

    async def wait(self, predicate, what: str, timeout: float = 30.0) -> None:
        """Until predicate() holds for the screen (checked as output comes), at most timeout seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.text()}")
            await asyncio.sleep(0.02)

    async def wait_for_text(self, text: str, timeout: float = 30.0) -> None:
        await self.wait(lambda: text in self.text(), repr(text), timeout)

    def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(rows, cols)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.kill(self.pid, signal.SIGWINCH)

    def toolbar_rows(self) -> list[str]:
        return [row for row in self.rows() if " verified of " in row or "no room (/join" in row]

    def prompt_row(self) -> str:
        """The row the cursor is on: where the draft is."""
        return self.rows()[self.screen.cursor.y]

    async def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            await asyncio.sleep(0.05)
        raise AssertionError(f"rtchat.py did not exit; the screen:\n{self.text()}")

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.fd)
        if self.pid:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextlib.asynccontextmanager
async def chat(tmp_path, broker, name="alice", room="vis", cols=80, rows=24, extra=(), **env):
    term = Terminal([name, "--room", room, "--state", str(tmp_path / f"{name}.json"), *extra],
                    cli_env(broker.url, TERM="xterm", **env), cols, rows)
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
            await term.wait(lambda: sorted(message_rows(term)) == sorted(said), "every message on a row of its own")
            for who in ("bob", "carol"):
                assert [row for row in message_rows(term) if row[0] == who] == [row for row in said if row[0] == who]
            assert term.prompt_row() == "[vis] draft number 3"
            assert [row for row in term.rows() if "draft" in row] == ["[vis] draft number 3"]
            assert len(term.toolbar_rows()) == 1 and term.toolbar_rows()[0].startswith(" #vis: 2 verified of 2 seen")
            received = []
            rb.on("message", received.append)
            term.type("\r")
            await term.wait(lambda: ("alice", "draft number 3") in message_rows(term), "the sent line")
            assert term.prompt_row() == "[vis]"
            await asyncio.wait_for(rb.wait_for_peers(2), 10)
            for client in clients:
                await client.close()
            await term.wait(lambda: "0 verified of 0 seen" in term.text(), "the status bar to follow")
            assert len(term.toolbar_rows()) == 1
            term.type("\x04")
            assert await term.exit_code() == 0
    run(scenario(), 90)
