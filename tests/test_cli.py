"""rtchat.py as people and scripts run it: real subprocesses, pipes, exit codes, a pty."""
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from support import ROOT, cli_env, eventually, make_client, rtchat_cmd, run

import rtchat


def start(args, env, stdin=subprocess.DEVNULL):
    return subprocess.Popen(rtchat_cmd(*args), env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_pipe_sender_delivers_and_listener_prints_json(broker, tmp_path):
    env = cli_env(broker.url)
    listener = start(["bot", "--room", "ops", "--state", str(tmp_path / "bot.json"), "--listen", "--json",
                      "--count", "3"], env)
    sender = subprocess.run(rtchat_cmd("ci-bot", "--room", "ops", "--state", str(tmp_path / "ci.json")),
                            input="build 42 passed\n\nsecond line\nüñí ☃\n", env=env, capture_output=True,
                            text=True, timeout=60)
    assert sender.returncode == 0, sender.stderr
    assert sender.stdout == ""  # status goes to stderr, never stdout
    assert "delivered 3 message(s) to 1 peer(s)" in sender.stderr
    out, err = listener.communicate(timeout=60)
    assert listener.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    messages = [e for e in events if e["type"] == "message"]
    assert [m["text"] for m in messages] == ["build 42 passed", "second line", "üñí ☃"]
    for m in messages:
        assert m["room"] == "ops" and m["from"] == "ci-bot" and isinstance(m["ts"], int) and m["id"]
        assert m["trust"] == "channel-bound" and len(m["fingerprint"]) == 64
    assert [(e["type"], e["from"]) for e in events[:2]] == [("verified", "ci-bot"), ("join", "ci-bot")]
    assert events[0]["channel_bound"] is True and events[0]["fingerprint"] == messages[0]["fingerprint"]


def test_plain_listener_prints_name_colon_text(broker, tmp_path):
    env = cli_env(broker.url)
    listener = start(["bot", "--room", "plain", "--state", str(tmp_path / "bot.json"), "--listen", "--count", "1"],
                     env)
    sender = subprocess.run(rtchat_cmd("alice", "--room", "plain", "--state", str(tmp_path / "a.json")),
                            input="hello there\n", env=env, capture_output=True, text=True, timeout=60)
    assert sender.returncode == 0, sender.stderr
    out, err = listener.communicate(timeout=60)
    assert out == "alice: hello there\n", err


def test_sender_without_peers_fails_clearly(broker, tmp_path):
    result = subprocess.run(rtchat_cmd("lonely", "--room", "empty", "--timeout", "1.5", "--state",
                                       str(tmp_path / "s.json")), input="hi\n", env=cli_env(broker.url),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == rtchat.EX_TEMPFAIL
    assert "no peer in #empty within 1.5 s" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_sender_gives_up_in_time_while_stdin_stays_open(broker, tmp_path):
    """`tail -f log | rtchat.py` with nobody there: the timeout holds even though stdin never ends."""
    sender = start(["ci", "--room", "nobody", "--timeout", "1.5", "--state", str(tmp_path / "s.json")],
                   cli_env(broker.url), stdin=subprocess.PIPE)
    try:
        assert sender.wait(timeout=30) == rtchat.EX_TEMPFAIL
    finally:
        sender.kill()
        sender.communicate()


def test_unreachable_broker_is_one_clear_line(tmp_path):
    result = subprocess.run(rtchat_cmd("alice", "--state", str(tmp_path / "s.json")), input="hi\n",
                            env=cli_env("mqtt://127.0.0.1:9"), capture_output=True, text=True, timeout=60)
    assert result.returncode == rtchat.EX_UNAVAILABLE
    assert "cannot reach broker mqtt://127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, code, text", [
    (["--version"], 0, rtchat.__version__),
    (["--help"], 0, "exit codes"),
    (["a(1)"], rtchat.EX_USAGE, "not allowed"),
    (["alice", "--room", "a+b"], rtchat.EX_USAGE, "cannot contain"),
    (["alice", "--broker", "http://x"], rtchat.EX_USAGE, "mqtt://"),
    ([], rtchat.EX_USAGE, "give your name"),
    (["alice", "--count", "0", "--listen"], rtchat.EX_USAGE, "--count"),
    (["alice", "--ice", "turn:nobody@host?transport=sctp"], rtchat.EX_USAGE, "bad ICE server"),
    (["--netcheck", "--ice", "none"], 0, "no STUN or TURN server to ask"),
    (["alice", "--max-peers", "2"], rtchat.EX_USAGE, "--max-peers (or RTCHAT_MAX_PEERS) must be 0"),
])
def test_usage_errors_and_info(tmp_path, args, code, text):
    result = subprocess.run(rtchat_cmd(*args, "--state", str(tmp_path / "s.json")), env=cli_env("mqtt://127.0.0.1:9"),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == code
    assert text in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_state_is_reported_and_kept(tmp_path):
    state = tmp_path / "s.json"
    state.write_text('{"format": 1, "name": "alice", ')
    result = subprocess.run(rtchat_cmd("alice", "--state", str(state)), env=cli_env("mqtt://127.0.0.1:9"),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == rtchat.EX_CONFIG
    assert str(state) in result.stderr and "untouched" in result.stderr
    assert state.read_text() == '{"format": 1, "name": "alice", '


def test_missing_packages_are_named_with_the_install_command(tmp_path):
    result = subprocess.run([sys.executable, "-S", str(ROOT / "rtchat.py"), "alice"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    if "missing Python packages" not in result.stderr and result.returncode == 0:
        pytest.skip("the packages are importable even without site-packages here")
    assert result.returncode == 1
    assert "missing Python packages: aiortc" in result.stderr and "-m pip install" in result.stderr
    assert "Traceback" not in result.stderr


def test_killed_peer_is_seen_gone_and_comes_back(broker, tmp_path):
    """bob answered pings, then is killed: alice sees him leave for want of pongs (within the bounded wait), and
    join again when he is back."""
    async def scenario():
        alice = await make_client("alice", tmp_path, broker.url).start()
        room = await alice.join("faults")
        events = []
        room.on("join", lambda peer: events.append(("join", peer.name)))
        room.on("leave", lambda peer, reason: events.append(("leave", peer.name)))
        args = ["bob", "--room", "faults", "--state", str(tmp_path / "bob.json"), "--listen"]
        bob = start(args, cli_env(broker.url))
        await eventually(lambda: ("join", "bob") in events, 20, "bob to join")
        await eventually(lambda: room.peers["bob"].rtt_ms is not None, 20, "bob's first pong")
        bob.send_signal(signal.SIGKILL)
        bob.wait()
        await eventually(lambda: ("leave", "bob") in events, 30, "bob to be seen gone")
        bob = start(args, cli_env(broker.url))
        await eventually(lambda: events.count(("join", "bob")) == 2, 20, "bob to come back")
        bob.terminate()
        bob.wait()
        await alice.close()
    run(scenario(), 90)


def _read_until(fd, needle: bytes, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen on the terminal; got {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if b"\x1b[6n" in chunk:  # answer the terminal's cursor-position request
                os.write(fd, b"\x1b[1;1R")
            seen += chunk
    return seen


def test_interactive_chat_in_a_terminal(broker, tmp_path):
    """A person at a terminal: prompt, a message to a listener, /peers, /help, an unknown command, Ctrl-D."""
    env = cli_env(broker.url, TERM="xterm")
    listener = start(["bob", "--room", "tty", "--state", str(tmp_path / "bob.json"), "--listen", "--count", "1"],
                     env)
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, rtchat_cmd("alice", "--room", "tty", "--state", str(tmp_path / "alice.json")), env)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        _read_until(fd, b"[tty]")
        _read_until(fd, b"bob", timeout=30)  # the join line
        os.write(fd, b"/frobnicate\r")
        _read_until(fd, b"unknown command /frobnicate")
        os.write(fd, b"/peers\r")
        _read_until(fd, b"channel-bound")
        os.write(fd, b"/help\r")
        _read_until(fd, b"/whois NAME")
        os.write(fd, b"hello from a terminal\r")
        out, err = listener.communicate(timeout=30)
        assert out == "alice: hello from a terminal\n", err
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with __import__("contextlib").suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    history = rtchat.Store(tmp_path / "alice.json").load()["input_history"]
    assert "hello from a terminal" in history and "/peers" in history


def test_sender_refuses_a_changed_key_with_its_own_exit_code(broker, tmp_path):
    env = cli_env(broker.url)
    for bob_state, timeout, code in (("bob.json", "20", 0), ("impostor.json", "4", rtchat.EX_NOPERM)):
        bob = start(["bob", "--room", "keys", "--state", str(tmp_path / bob_state), "--listen"], env)
        result = subprocess.run(rtchat_cmd("ci", "--room", "keys", "--timeout", timeout, "--state",
                                           str(tmp_path / "ci.json")),
                                input="hi\n", env=env, capture_output=True, text=True, timeout=60)
        bob.terminate()
        bob.communicate(timeout=30)
        assert result.returncode == code, result.stderr  # first contact pins bob's key; another key is refused
    assert "refused bob: not the pinned key" in result.stderr and "DIFFERENT KEY" in result.stderr
