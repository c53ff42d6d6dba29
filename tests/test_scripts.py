"""What scripts and bots get (issue 10): pipes reach the whole room, listeners see only what is new, history is
never news, every event in --json, exit codes as --help says, one-shot file sends. Real rtchat.py subprocesses,
real mosquitto, rooms of three or more."""
import asyncio
import hashlib
import json
import signal
import subprocess

import pytest
from support import ROOT, Proc, cli_env, eventually, make_client, rtchat_cmd, run

import rtchat


def listen(name, room, tmp_path, env, *extra, state=None) -> Proc:
    return Proc([name, "--room", room, "--state", str(state or tmp_path / f"{name}.json"), "--listen", "--json",
                 *extra], env)


def wait_mesh(procs, timeout=40):
    """Until every listener has seen every other one join (a room of N, fully connected)."""
    names = {p.args[0] for p in procs}
    for p in procs:
        others = names - {p.args[0]}
        p.wait_for(lambda q, others=others: others <= {e["from"] for e in q.events() if e["type"] == "join"},
                   timeout, f"joins of {sorted(others)}")


def pipe(name, room, tmp_path, env, text, *extra, state=None):
    return subprocess.run(rtchat_cmd(name, "--room", room, "--state", str(state or tmp_path / f"{name}.json"),
                                     *extra), input=text, env=env, capture_output=True, text=True, timeout=90)


def stop_all(procs):
    return [p.stop() for p in procs]


# 1. A pipe reaches the whole room, and a listener that exits after a line acknowledges it first -----------------

def test_pipe_reaches_every_listener_live_every_time(broker, tmp_path):
    env = cli_env(broker.url)
    room = [listen(n, "all", tmp_path, env) for n in ("alice", "bob", "carol")]
    try:
        wait_mesh(room)
        for run_no in range(4):
            lines = [f"run {run_no} line {i}" for i in range(2)]
            result = pipe("ci", "all", tmp_path, env, "".join(f"{line}\n" for line in lines), "--timeout", "20")
            assert result.returncode == 0, result.stderr
            assert "delivered 2 message(s) to 3 peer(s): alice, bob, carol" in result.stderr
            for p in room:
                p.wait_for(lambda q, lines=lines: set(lines) <= {m["text"] for m in q.messages(**{"from": "ci"})},
                           20, f"run {run_no}")
        for p in room:
            got = p.messages(**{"from": "ci"})
            assert [m["text"] for m in got] == [f"run {r} line {i}" for r in range(4) for i in range(2)]
            assert all(m["trust"] == "channel-bound" and "history" not in m for m in got)  # live, not backfill
    finally:
        codes = stop_all(room)
    assert codes == [130, 130, 130]


def test_listeners_that_exit_after_one_line_acknowledge_it(broker, tmp_path):
    env = cli_env(broker.url)
    room = [listen(n, "once", tmp_path, env, "--count", "1") for n in ("alice", "bob", "carol")]
    try:
        wait_mesh(room)
        result = pipe("ci", "once", tmp_path, env, "the one line\n", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert "delivered 1 message(s) to 3 peer(s): alice, bob, carol" in result.stderr
        for p in room:
            assert p.proc.wait(30) == 0
            assert [m["text"] for m in p.messages()] == ["the one line"]
    finally:
        stop_all(room)


def test_an_empty_pipe_leaves_nobody_out(broker, tmp_path):
    """Nothing on stdin: nothing to deliver, so nobody in the room was left out (exit 0, as before issue 10)."""
    env = cli_env(broker.url)
    room = [listen(n, "empty", tmp_path, env) for n in ("alice", "bob")]
    try:
        wait_mesh(room)
        result = pipe("ci", "empty", tmp_path, env, "", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert "delivered 0 message(s)" in result.stderr and "not delivered" not in result.stderr
    finally:
        stop_all(room)


def test_pipe_names_who_was_not_reached(broker, tmp_path):
    """bob is in the room but refused (a changed key): alice gets the line, and the exit code says bob did not."""
    env = cli_env(broker.url)
    alice = listen("alice", "partial", tmp_path, env)
    first = listen("bob", "partial", tmp_path, env)
    impostor = None
    try:
        wait_mesh([alice, first])
        assert pipe("ci", "partial", tmp_path, env, "hello both\n", "--timeout", "20").returncode == 0
        first.stop()
        impostor = listen("bob", "partial", tmp_path, env, state=tmp_path / "other-bob.json")
        impostor.said("listening", 20)
        result = pipe("ci", "partial", tmp_path, env, "only alice\n", "--timeout", "6")
        assert result.returncode == rtchat.EX_NOPERM, result.stderr
        assert "delivered 1 message(s) to 1 peer(s): alice" in result.stderr
        assert "refused bob" in result.stderr and "Traceback" not in result.stderr
        alice.wait_for(lambda q: any(m["text"] == "only alice" for m in q.messages()), 20, "alice's line")
    finally:
        stop_all([p for p in (alice, first, impostor) if p])


# 2. History is never news -------------------------------------------------------------------------------------

def test_listeners_take_only_news_for_news(broker, tmp_path):
    """A fresh --count 1 listener meets a keeper of old lines and their author: it prints only the new line.
    --history 2 prints the two newest old ones, marked, then the new one."""
    env = cli_env(broker.url)
    keeper = listen("keeper", "news", tmp_path, env)
    try:
        keeper.said("listening", 20)
        old = [f"old {i}" for i in range(5)]
        assert pipe("ci", "news", tmp_path, env, "".join(f"{t}\n" for t in old)).returncode == 0
        keeper.wait_for(lambda q: len(q.messages()) == 5, 20, "the old lines")
        fresh = listen("fresh", "news", tmp_path, env, "--count", "1")
        marked = listen("marked", "news", tmp_path, env, "--count", "1", "--history", "2")
        marked.wait_for(lambda q: len(q.messages(history=True)) == 2, 20, "two history lines")
        wait_mesh([keeper, fresh, marked])
        # the author comes back: it passes its own old lines on to the newcomers, as history
        result = pipe("ci", "news", tmp_path, env, "new\n", "--wait-peers", "3", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert fresh.proc.wait(30) == 0 and marked.proc.wait(30) == 0
        assert [(m["text"], m["trust"], "history" in m) for m in fresh.messages()] == [("new", "channel-bound", False)]
        got = marked.messages()
        assert [m["text"] for m in got[2:]] == ["new"] and "history" not in got[2]
        # passed on by keeper while their author, whom marked had never met, was away: unverified (issue 12)
        assert all(m["history"] is True and m["trust"] == "unverified" for m in got[:2])
        assert [m["text"] for m in got[:2]] == old[-2:]  # the keeper passes all five on at once, oldest first
    finally:
        stop_all([keeper])


def test_plain_listener_marks_history(broker, tmp_path):
    """Without --json too, --history N lines say they are history; news does not."""
    env = cli_env(broker.url)
    args = ["alice", "--room", "plain", "--state", str(tmp_path / "alice.json"), "--listen"]
    first = Proc(args, env)
    try:
        first.said("listening", 20)
        assert pipe("ci", "plain", tmp_path, env, "old line\n").returncode == 0
    finally:
        first.stop()
    assert first.out == ["ci: old line"]
    again = Proc([*args, "--history", "1", "--count", "1"], env)
    try:
        again.wait_for(lambda q: q.out, 20, "the history line")
        assert pipe("ci", "plain", tmp_path, env, "new line\n").returncode == 0
        assert again.proc.wait(30) == 0
        assert again.out == ["ci: old line  (history)", "ci: new line"]
    finally:
        again.stop()


def test_library_and_plugins_get_history_apart_from_messages(broker, tmp_path):
    """room.on("message") and @on("message") fire for new messages only; backfill is a "history" event."""
    async def scenario():
        alice, bob = [await make_client(n, tmp_path, broker.url).start() for n in ("alice", "bob")]
        ra = await alice.join("lib")
        await bob.join("lib")
        await ra.wait_for_peers(1, 20)
        for i in range(3):
            ra.send(f"before {i}")
        assert await ra.flush(10)
        carol = await make_client("carol", tmp_path, broker.url).start()
        seen = {"message": [], "history": [], "hook message": [], "hook history": []}
        registry = rtchat.Registry()
        registry.collect({"m": rtchat.on("message")(lambda ctx, msg: seen["hook message"].append(msg.text)),
                          "h": rtchat.on("history")(lambda ctx, msg: seen["hook history"].append(msg.text))}, "t")
        app = rtchat.App(carol, registry, rtchat.Printer("quiet", False))
        await app.switch_room("lib")
        rc = app.room
        rc.on("message", lambda msg: seen["message"].append(msg.text))
        rc.on("history", lambda msg: seen["history"].append((msg.text, msg.history, msg.trust)))
        await rc.wait_for_peers(2, 20)
        await eventually(lambda: len(seen["history"]) == 3 and len(seen["hook history"]) == 3, 10, "backfill")
        assert sorted(seen["history"]) == [(f"before {i}", True, "relayed") for i in range(3)]
        await ra.wait_for_peers(2, 20)  # alice has verified carol too: what she says now reaches carol as news
        ra.send("after")
        await eventually(lambda: seen["message"] and seen["hook message"], 10, "the new message")
        assert seen["message"] == seen["hook message"] == ["after"]
        assert all(m.history for m in rc.history(10))
        for c in (alice, bob, carol):
            await c.close()
    run(scenario(), 90)


def test_a_listener_sends_nothing_for_a_plugin(broker, tmp_path):
    """contrib/dice.py rolls when asked by name in a chat; alice, a --listen, asked the same says nothing."""
    env = cli_env(broker.url)
    room = [listen(n, "mute", tmp_path, env) for n in ("alice", "bob")]
    try:
        wait_mesh(room)
        for line in ("alice: roll 2d6", "after"):  # alice acknowledged the request before "after" is sent
            assert pipe("ci", "mute", tmp_path, env, f"{line}\n").returncode == 0
        for p in room:
            p.wait_for(lambda q: any(m["text"] == "after" for m in q.messages()), 20, "the second line")
            assert [(m["from"], m["text"]) for m in p.messages()] == [("ci", "alice: roll 2d6"), ("ci", "after")]
    finally:
        stop_all(room)


# 3. A pipe sender writes nothing to stdout --------------------------------------------------------------------

def test_pipe_sender_stdout_stays_empty_while_it_receives(broker, tmp_path):
    env = cli_env(broker.url)
    keeper = listen("keeper", "quiet", tmp_path, env)
    other = listen("other", "quiet", tmp_path, env)
    try:
        wait_mesh([keeper, other])
        assert pipe("ci", "quiet", tmp_path, env, "old line\n").returncode == 0
        keeper.wait_for(lambda q: q.messages(), 20, "the old line")
        result = pipe("ci2", "quiet", tmp_path, env, "fresh line\n", "--wait-peers", "2")  # backfilled "old line"
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert "delivered 1 message(s) to 2 peer(s)" in result.stderr
    finally:
        stop_all([keeper, other])


# 6. Exit codes as --help says -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_listener_interrupted_exits_130(broker, tmp_path, sig):
    p = listen("bot", "sig", tmp_path, cli_env(broker.url))
    p.said("listening", 20)
    assert p.stop(sig) == 130


def test_ctrl_c_while_the_packages_load_exits_130_without_a_traceback(tmp_path):
    """The interrupt is made to come while aiortc loads (a stand-in that raises it), where a person's Ctrl-C
    lands in the first part of a second."""
    (tmp_path / "aiortc").mkdir()
    (tmp_path / "aiortc" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = cli_env("mqtt://127.0.0.1:9", PYTHONPATH=str(tmp_path))
    result = subprocess.run(rtchat_cmd("alice", "--listen"), env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 130 and result.stderr == ""


@pytest.mark.parametrize("args, text", [
    (["--broker", "not a url"], "not a host name"),
    (["--json"], "--json does not apply to pipe mode"),
    (["--count", "2"], "--count does not apply to pipe mode"),
    (["--history", "5"], "--history does not apply to pipe mode"),
    (["--listen", "--wait-peers", "2"], "--wait-peers does not apply to listen mode"),
    (["--listen", "--timeout", "5"], "--timeout does not apply to listen mode"),
    (["--listen", "--timeout", "0"], "--timeout does not apply to listen mode"),
    (["--listen", "--wait-peers", "0"], "--wait-peers does not apply to listen mode"),
    (["--history", "0"], "--history does not apply to pipe mode"),
    (["--listen", "--send", "x", "--to", "bob"], "--send does not apply to listen mode"),
    (["--send", "README.md"], "go together"),
    (["--to", "bob"], "go together"),
    (["--send", "no-such-file", "--to", "bob"], "not a file"),
    (["--send", "README.md", "--to", "bob", "--wait-peers", "1"], "--wait-peers does not apply to send mode"),
])
def test_options_of_another_mode_are_usage_errors(tmp_path, args, text):
    result = subprocess.run(rtchat_cmd("alice", *args, "--state", str(tmp_path / "s.json")),
                            env=cli_env("mqtt://127.0.0.1:9"), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
    assert result.returncode == rtchat.EX_USAGE, result.stderr
    assert text in result.stderr and "Traceback" not in result.stderr


# 7. --json: a line for every event ----------------------------------------------------------------------------------

def test_json_has_a_line_for_every_event(broker, tmp_path):
    """verified, join, message, dm, file, file-progress, delivered, key-changed, leave and history, as a script sees
    them."""
    async def prepare():  # bot and carol meet; then bot leaves a DM for carol in its outbox
        bot, carol = [await make_client(n, tmp_path, broker.url).start() for n in ("bot", "carol")]
        rb, rc = await bot.join("events"), await carol.join("events")
        await rb.wait_for_peers(1, 20)
        rc.send("said before")
        assert await rc.flush(10)
        await carol.close()
        await eventually(lambda: not rb.peers, 20, "carol gone")
        rb.dm("carol", "waiting for you")
        await bot.close()
    run(prepare(), 60)
    files = tmp_path / "inbox"
    bot = listen("bot", "events", tmp_path, cli_env(broker.url), "--files", str(files), "--history", "5")

    async def scenario():
        carol = await make_client("carol", tmp_path, broker.url).start()
        rc = await carol.join("events")
        dms = []
        rc.on("dm", dms.append)
        await rc.wait_for_peer("bot", 20)
        await eventually(lambda: dms, 20, "the waiting DM")
        rc.send("hello bot")
        rc.dm("bot", "psst")
        (tmp_path / "notes.txt").write_text("some notes\n")
        assert await rc.send_file("bot", tmp_path / "notes.txt") == "notes.txt"
        channel = await rc.peers["bot"].open_channel("file/bad")     # a file whose SHA-256 does not match
        channel.send(json.dumps({"name": "bad.txt", "size": 3, "sha256": "0" * 64}))
        channel.send(b"abc")
        await asyncio.get_running_loop().run_in_executor(None, bot.wait_for, lambda q: any(
            e["type"] == "file-progress" and e["state"] == "failed" for e in q.events()), 20, "the failed file")
        assert await rc.flush(10)
        await carol.close()
        impostor = await make_client("carol", tmp_path / "impostor", broker.url).start()
        await impostor.join("events")
        await asyncio.get_running_loop().run_in_executor(None, bot.wait_for, lambda q: any(
            e["type"] == "key-changed" for e in q.events()), 20, "the key-changed line")
        await impostor.close()
    try:
        bot.said("listening", 20)
        run(scenario(), 90)
        bot.wait_for(lambda q: any(e["type"] == "leave" for e in q.events()), 20, "the leave line")
    finally:
        assert bot.stop() == 130
    events = bot.events()
    by_type = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
        assert {"type", "room", "from", "text", "fingerprint", "ts"} <= set(e) and e["room"] == "events"
    # history is type "message" with "history": true; no-route needs a network without a path (test_networks.py);
    # the others need a plugin, a /trust or a refusal to happen (test_screen.py); a full disk or forged history
    # (test_hardening.py), a failing compaction (test_ledger.py);
    # a man in the middle, or a peer that proves no key (test_attacks.py); a DM to someone away (test_commands.py);
    # members with no path to each other (test_relay.py)
    assert set(by_type) == set(rtchat.EVENTS) - {"history", "no-route", "status", "question-failed", "key-accepted",
                                                 "key-refused", "disk-error", "disk-ok", "history-conflict",
                                                 "compaction-failed", "mitm-detected", "verify-failed", "queued",
                                                 "relayed", "relay-refused"}
    earlier = [(e["type"], e["text"]) for e in events if e.get("history")]
    assert earlier == [("message", "said before"), ("dm", "waiting for you")]
    live = [(e["type"], e["text"]) for e in events if e["type"] in ("message", "dm") and not e.get("history")]
    assert live == [("message", "hello bot"), ("dm", "psst")]
    assert by_type["verified"][0]["from"] == "carol" and by_type["verified"][0]["channel_bound"] is True
    assert by_type["delivered"][0]["from"] == "carol" and by_type["delivered"][0]["id"]
    got = by_type["file"][0]
    assert got["sha256"] == hashlib.sha256(b"some notes\n").hexdigest() and got["path"] == str(files / "notes.txt")
    progress = [(e["name"], e["state"]) for e in by_type["file-progress"]]
    assert progress[0] == ("notes.txt", "offered") and ("notes.txt", "done") in progress
    failed = [e for e in by_type["file-progress"] if e["state"] == "failed"]
    assert failed[0]["name"] == "bad.txt" and "SHA-256" in failed[0]["error"] and "bad.txt" in failed[0]["text"]
    assert by_type["key-changed"][0]["verdict"] == "changed" and by_type["key-changed"][0]["from"] == "carol"
    assert by_type["leave"][0]["reason"] and by_type["leave"][0]["from"] == "carol"


# A one-shot file send from scripts ------------------------------------------------------------------------------

def test_send_one_file_from_a_script(broker, tmp_path):
    env = cli_env(broker.url)
    inbox = tmp_path / "inbox"
    bob = listen("bob", "files", tmp_path, env, "--files", str(inbox))
    carol = listen("carol", "files", tmp_path, env)
    payload = tmp_path / "build.tar.gz"
    payload.write_bytes(bytes(range(256)) * 4000)
    try:
        wait_mesh([bob, carol])
        result = subprocess.run(rtchat_cmd("ci", "--room", "files", "--state", str(tmp_path / "ci.json"), "--send",
                                           str(payload), "--to", "bob", "--timeout", "20"),
                                env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert (inbox / "build.tar.gz").read_bytes() == payload.read_bytes()
        assert "bob has" in result.stderr and "SHA-256 checked" in result.stderr
        assert "\r" not in result.stderr and result.stdout == ""  # no progress line: stderr is not a terminal
        bob.wait_for(lambda q: any(e["type"] == "file" for e in q.events()), 20, "the file line")
        line = next(e for e in bob.events() if e["type"] == "file")
        assert line["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest() and line["from"] == "ci"
        for to, code, text in (("carol", rtchat.EX_USAGE, "does not take files"),
                               ("nobody", rtchat.EX_TEMPFAIL, "nobody was not verified")):
            result = subprocess.run(rtchat_cmd("ci", "--room", "files", "--state", str(tmp_path / "ci.json"),
                                               "--send", str(payload), "--to", to, "--timeout", "3"),
                                    env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
            assert result.returncode == code and text in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
    finally:
        stop_all([bob, carol])


def test_the_dice_plugin_answers_requests_once_never_from_history(broker, tmp_path):
    """contrib/dice.py rolls for "carol: roll 1d6" said live in the room, not for the same request passed on as
    history when carol comes later."""
    async def scenario():
        registry = rtchat.Registry()
        rtchat.load_plugins(registry, [ROOT / "contrib"])
        alice, bob = [await make_client(n, tmp_path, broker.url).start() for n in ("alice", "bob")]
        ra = await alice.join("dice")
        await bob.join("dice")
        await ra.wait_for_peers(1, 20)
        rolls = []
        ra.on("message", lambda msg: msg.action and msg.text.startswith("rolled") and rolls.append(msg.sender))
        ra.send("carol: roll 1d6")  # carol is not here yet
        assert await ra.flush(10)
        carol = await make_client("carol", tmp_path, broker.url).start()
        app = rtchat.App(carol, registry, rtchat.Printer("quiet", False))
        await app.switch_room("dice")
        passed_on = []
        app.room.on("history", passed_on.append)
        await app.room.wait_for_peers(2, 20)
        await eventually(lambda: passed_on, 10, "the old request, passed on")
        await ra.wait_for_peer("carol", 10)  # carol's side may verify alice first, and bob may pass the old one on
        ra.send("carol: roll 1d6")
        await eventually(lambda: rolls, 10, "carol's roll")
        assert await app.room.flush(10)
        assert rolls == ["carol"] and ra.history(1)[0].sender == "carol"
        for c in (alice, bob, carol):
            await c.close()
    run(scenario(), 90)
