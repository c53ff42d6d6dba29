"""Commands and plugins: the registry, handle_line, contrib/ loading, a broken plugin, every example."""
import asyncio
import io
import time

from support import ROOT, eventually, make_client, run

import rtchat


def registry_with_contrib():
    registry = rtchat.Registry()
    registry.collect(vars(rtchat), "core")
    loaded, skipped = rtchat.load_plugins(registry, [ROOT / "contrib"])
    return registry, loaded, skipped


def test_contrib_plugins_load():
    registry, loaded, skipped = registry_with_contrib()
    assert {"clock", "dice"} <= set(loaded) and not skipped
    assert {"time", "ping", "uptime", "d20"} <= set(registry.questions)
    assert registry.commands["roll"].origin == "dice"


def test_broken_plugins_are_skipped_with_one_line(tmp_path):
    (tmp_path / "good.py").write_text(
        "from rtchat import command\n@command('hi', help='x')\nasync def hi(ctx, a): pass\n")
    (tmp_path / "broken.py").write_text("import rtchat\nundefined_name\n")
    (tmp_path / "badevent.py").write_text("from rtchat import on\n@on('explode')\ndef f(ctx, v): pass\n")
    (tmp_path / "_private.py").write_text("raise SystemExit\n")
    registry = rtchat.Registry()
    loaded, skipped = rtchat.load_plugins(registry, [tmp_path])
    assert loaded == ["good"]
    assert len(skipped) == 2
    assert any("broken.py skipped: NameError" in line for line in skipped)
    assert any("badevent.py skipped: ValueError: @on('explode')" in line for line in skipped)
    assert all("\n" not in line for line in skipped)


def test_every_builtin_command_has_help_and_usage():
    registry = rtchat.Registry()
    registry.collect(vars(rtchat), "core")
    for name in ("help", "join", "part", "peers", "whois", "msg", "me", "ask", "trust", "untrust", "whoami",
                 "history", "quit", "say", "rooms", "clear", "netcheck", "switch", "ignore", "unignore", "lastlog"):
        spec = registry.commands[name]
        assert spec.help and spec.usage.startswith("/" + name)


class Scene:
    """Two real clients; alice has an App whose output is captured, bob has the contrib plugins."""

    def __init__(self, tmp_path, broker):
        self.tmp_path, self.broker = tmp_path, broker

    async def __aenter__(self):
        self.alice = await make_client("alice", self.tmp_path, self.broker.url).start()
        self.bob = await make_client("bob", self.tmp_path, self.broker.url, files=self.tmp_path / "bob-files").start()
        registry, _, _ = registry_with_contrib()
        self.out = io.StringIO()
        self.app = rtchat.App(self.alice, registry, rtchat.Printer("chat", False, self.out, self.out))
        self.bob_app = rtchat.App(self.bob, registry, rtchat.Printer("plain", False, io.StringIO(), io.StringIO()))
        await self.app.switch_room("cmds")
        await self.bob_app.switch_room("cmds")
        await self.app.room.wait_for_peers(1, 20)
        await self.bob_app.room.wait_for_peers(1, 20)
        self.received = []
        self.bob_app.room.on("message", self.received.append)
        self.bob_app.room.on("dm", self.received.append)
        return self

    async def __aexit__(self, *exc):
        await self.alice.close()
        await self.bob.close()

    async def line(self, text):
        self.out.seek(0)
        self.out.truncate()
        await self.app.run_line(text)
        return self.out.getvalue()


def test_lines_and_commands(broker, tmp_path):
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            await s.line("plain text")
            await s.line("//slash at the start")
            await s.line("/me waves")
            await s.line("/msg bob a secret")
            await eventually(lambda: len(s.received) == 4, what="four deliveries")
            texts = [(m.kind, m.text, m.action) for m in s.received]
            assert texts == [("message", "plain text", False), ("message", "/slash at the start", False),
                             ("message", "waves", True), ("dm", "a secret", False)]
            out = await s.line("/frobnicate now")
            assert "unknown command /frobnicate" in out and "nothing was sent" in out
            await s.line("after the unknown command")  # one channel, in order: had it sent, it would come first
            await eventually(lambda: len(s.received) >= 5, what="the line after")
            assert [m.text for m in s.received[4:]] == ["after the unknown command"]
            assert "bob answers: pong" in await s.line("/ask bob ping")
            assert "no answer" in await s.line("/ask bob weather")
            whois = await s.line("/whois bob")
            assert rtchat.show_fingerprint(s.bob.identity.fingerprint) in whois
            assert rtchat.safety_number(s.alice.identity.fingerprint, s.bob.identity.fingerprint) in whois
            assert "verified, channel-bound" in await s.line("/peers") and ", direct" in await s.line("/peers")
            assert "no STUN or TURN server to ask (--ice)" in await s.line("/netcheck")
            assert "usage: /msg NAME TEXT" in await s.line("/msg bob")
            assert "no peer called 'zed'" in await s.line("/msg zed hi")
            listed = await s.line("/help")
            assert "/roll NdS" in listed and "/join ROOM" in listed and "/connect" not in listed  # PeerJS's only
            assert "/connect: it is for the PeerJS network" in await s.line("/connect bob")
            assert "example: /roll 2d6" in await s.line("/help roll")
            assert "plain text" in await s.line("/history 5")
            assert "forgot 1 key(s) of bob" in await s.line("/untrust bob")
            assert "pinned bob" in await s.line("/trust bob")
            assert s.alice.identity.fingerprint[:4] in (await s.line("/whoami")).replace(" ", "")
            assert "give dice as NdS" in await s.line("/roll lots")
            (tmp_path / "notes.txt").write_text("for bob")
            await eventually(lambda: s.app.room.peers["bob"].takes_files, what="bob's hello")
            out = await s.line(f"/send bob {tmp_path / 'notes.txt'}")
            assert "sending" in out and "go on chatting" in out, out
            await eventually(lambda: "bob has" in s.out.getvalue(), what="the transfer's result")
            assert "as notes.txt (7 bytes" in s.out.getvalue() and "checked" in s.out.getvalue()
            assert (tmp_path / "bob-files" / "notes.txt").read_text() == "for bob"
            assert "is not a file" in await s.line(f"/send bob {tmp_path / 'nope.txt'}")
            assert "usage: /send NAME PATH" in await s.line("/send bob")
            assert "no peer called 'zed'" in await s.line(f"/send zed {tmp_path / 'notes.txt'}")
    run(scenario())


def test_a_dm_to_someone_away_says_it_waits(broker, tmp_path):
    """bob was verified, then left: /msg bob is kept in the outbox, and alice is told so in a line (an event,
    "queued", worded by the chat and printed by --json)."""
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            await s.bob.close()
            await eventually(lambda: not s.app.room.verified_peers(), 15, "bob gone")
            out = await s.line("/msg bob see you later")
            assert "-!- bob is away: the message waits and goes out when they are back" in out
            assert [m.text for m in s.app.room.outbox()] == ["see you later"]
            record = rtchat.event_record(s.app.room, "queued", s.app.room.outbox()[0])
            assert (record["type"], record["from"]) == ("queued", "bob")
    run(scenario())


def test_every_example_runs(broker, tmp_path):
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            specs = [spec for spec in s.app.registry.unique_commands() if spec.example]
            assert {"roll", "uptime", "ask", "me", "join"} <= {spec.name for spec in specs}
            for spec in sorted(specs, key=lambda spec: spec.name == "join"):  # /join moves us: last
                out = await s.line(spec.example.replace("NAME", "bob"))
                assert "failed" not in out and "-!- usage" not in out, (spec.example, out)
            assert s.app.room.name == "ops"
    run(scenario())


def test_quit_ends_the_app(broker, tmp_path):
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            await s.line("/quit")
            assert s.app.done.is_set()
    run(scenario())


def test_rooms_side_by_side(broker, tmp_path):
    """/join adds a room and goes there, /switch moves, /part leaves one; a bad name changes nothing."""
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            assert "you are not in #ops" in await s.line("/switch ops")
            await s.line("/join ops")
            assert [room.name for room in s.app.rooms] == ["cmds", "ops"] and s.app.room.name == "ops"
            for bad in ("/join #", "/join two words", "/join " + "x" * 201, "/join a+b"):
                assert "-!- " in await s.line(bad) and s.app.room.name == "ops", bad
            await s.line("/switch #cmds")
            assert s.app.room.name == "cmds"
            rooms = await s.line("/rooms")
            assert "1: #cmds (here" in rooms and "2: #ops (joined" in rooms
            assert "left #ops; now in #cmds" in await s.line("/part ops")
            assert [room.name for room in s.app.rooms] == ["cmds"]
            assert "you are in no room" in await s.line("/part")
            assert s.app.room is None and "no room" in s.app.toolbar()[0][1]
    run(scenario())


def test_ignore_lastlog_and_dates(broker, tmp_path):
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            bob_room = s.bob_app.room
            assert "ignoring bob" in await s.line("/ignore bob")
            bob_room.send("you cannot hear me")
            await eventually(lambda: any(m.text == "you cannot hear me" for m in s.app.room.history(5)))
            assert "you cannot hear me" not in s.out.getvalue()
            assert rtchat.Store(tmp_path / "alice.json").load()["ignored"] == ["bob"]  # kept across restarts
            assert "no longer ignoring bob" in await s.line("/unignore bob")
            assert "you do not ignore bob" in await s.line("/unignore bob")
            bob_room.send("the Deploy is done")
            await eventually(lambda: any(m.text == "the Deploy is done" for m in s.app.room.history(5)))
            found = await s.line("/lastlog deploy")
            assert "<bob> the Deploy is done" in found and "1 message(s) with 'deploy'" in found
            assert "cannot hear" not in found
            # lines not from today carry their date
            old = rtchat.Message(id="x", room="cmds", sender="bob", text="last year", ts=1_700_000_000_000)
            s.app.show(old, from_history=True)
            assert time.strftime("%Y-%m-%d %H:%M <bob> last year", time.localtime(1_700_000_000)) in s.out.getvalue()
    run(scenario())


def test_a_hook_acts_in_the_room_its_event_came_from(broker, tmp_path):
    """contrib/dice.py asked in #cmds while alice looks at #ops: the roll goes to #cmds, where it was asked."""
    async def scenario():
        async with Scene(tmp_path, broker) as s:
            await s.line("/join ops")
            assert s.app.room.name == "ops"
            s.bob_app.room.send("alice: roll 1d6")
            await eventually(lambda: any(m.sender == "alice" and m.action for m in s.received), 10, "alice's roll")
            roll = next(m for m in s.received if m.sender == "alice")
            assert roll.room == "cmds" and roll.text.startswith("rolled 1d6")
            assert f"#cmds {time.strftime('%H:%M')} * alice rolled 1d6" in s.out.getvalue()
    run(scenario())


SHOUTER = '''
from rtchat import on, question

@on("message")
async def shout(ctx, msg):
    if msg.text == "shout":
        await ctx.say(f"SHOUT in #{ctx.room.name}")

@question("where")
def where(ctx, q):
    return f"{ctx.me} in #{ctx.room.name}, asked by {q.sender.name}"
'''


def test_a_bot_puts_plugins_to_work_without_a_front_end(broker, tmp_path):
    """rtchat.Plugins: plugin files and the bot's own handlers, (ctx, q) questions, hooks of attached rooms; leaving
    `async with` lets a running hook finish, close(timeout=0) cancels it."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "shouter.py").write_text(SHOUTER)
    (tmp_path / "plugins" / "broken.py").write_text("import rtchat\nundefined_name\n")
    release, started, finished, cancelled = asyncio.Event(), [], [], []

    @rtchat.question("status")
    def status(ctx, q):
        ctx.state["asked"] = ctx.state.get("asked", 0) + 1
        return f"all green, {q.sender.name} (asked {ctx.state['asked']} times)"

    @rtchat.on("message")
    async def slow(ctx, msg):
        if msg.text == "slow":
            started.append(msg.text)
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(msg.text)
                raise
            finished.append(msg.text)

    async def scenario():
        bot = await make_client("bot", tmp_path, broker.url).start()
        alice = await make_client("alice", tmp_path, broker.url).start()
        async with rtchat.Plugins(bot, [tmp_path / "plugins"]) as plugins:
            assert plugins.loaded == ["shouter"] and "broken.py skipped: NameError" in plugins.skipped[0]
            plugins.add(status, slow)
            plugins.attach(await bot.join("bots"))
            ra = await alice.join("bots")
            await ra.wait_for_peer("bot", 20)
            heard = []
            ra.on("message", heard.append)
            ra.send("shout")
            await eventually(lambda: heard, 10, "the shout")
            assert (heard[0].sender, heard[0].text) == ("bot", "SHOUT in #bots")
            assert await ra.ask("bot", "where") == "bot in #bots, asked by alice"
            assert await ra.ask("bot", "status") == "all green, alice (asked 1 times)"
            assert await ra.ask("bot", "status") == "all green, alice (asked 2 times)"
            ra.send("slow")
            await eventually(lambda: started, 10, "the slow hook")
            asyncio.get_running_loop().call_soon(release.set)  # once leaving `async with` waits for it
        assert finished == ["slow"] and not cancelled
        release.clear()
        plugins.attach(bot.rooms["bots"])
        ra.send("slow")
        await eventually(lambda: len(started) == 2, 10, "the slow hook again")
        await plugins.close(timeout=0)
        assert cancelled == ["slow"] and finished == ["slow"]
        await alice.close()
        await bot.close()
    run(scenario())
