"""Persistence that loses nothing: history on disk, backfill between peers, the outbox, faults."""
import asyncio
import json
import signal
import subprocess

from support import cli_env, eventually, make_client, rtchat_cmd, run

import rtchat


async def started(tmp_path, url, *names, room="room"):
    clients = [await make_client(n, tmp_path, url).start() for n in names]
    rooms = [await c.join(room) for c in clients]
    return clients, rooms


async def close_all(clients):
    for c in clients:
        await c.close()


def test_late_joiner_gets_what_was_said_in_order_once(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await started(tmp_path, broker.url, "alice", "bob")
        await ra.wait_for_peers(1, 20)
        for i in range(6):
            sender = ra if i % 2 == 0 else rb
            sender.send(f"line {i}")
            assert await sender.flush(5)  # the other has it before it speaks: both keep them in this order
        carol = await make_client("carol", tmp_path, broker.url).start()
        got = []
        rc = await carol.join("room")
        rc.on("history", got.append)  # said before carol came: history, never news
        await rc.wait_for_peers(2, 20)
        await eventually(lambda: len(got) >= 6, what="backfill")
        # carol asks each one for what she missed once it says hello, and each answers at once; a line she says
        # after asking both is acknowledged after their answers, on the same channel: by then both are in
        await eventually(lambda: all(p.message_key for p in rc.verified_peers()), what="both hellos")
        rc.send("carol is here")
        assert await rc.flush(10)
        assert [m.text for m in got] == [f"line {i}" for i in range(6)]
        for m in got:  # passed on by its author or by the other, the author's signature checked either way
            assert m.history and m.trust == "relayed" and m.relayed_by in ("alice", "bob")
        assert [m.text for m in rc.history(10)] == [f"line {i}" for i in range(6)] + ["carol is here"]
        await close_all([alice, bob, carol])
    run(scenario())


def test_relayed_messages_are_checked_and_marked(broker, tmp_path):
    """History passed on by bob about alice, whom carol has never met: kept exactly, marked unverified (bob could
    have made alice's key up); words that are not what their id was made for, or not what alice signed, are
    refused. Once carol has met alice, alice's words passed on by bob are checked."""
    async def scenario():
        (alice, bob), (ra, rb) = await started(tmp_path, broker.url, "alice", "bob")
        await ra.wait_for_peers(1, 20)
        ra.send("said while carol was away\twith a tab")
        assert await ra.flush(5)
        await alice.close()
        carol = await make_client("carol", tmp_path, broker.url).start()
        rc = await carol.join("room")
        got, conflicts = [], []
        rc.on("history", got.append)
        rc.on("history-conflict", lambda peer, claimed: conflicts.append(claimed))
        await eventually(lambda: got, 20, "the relayed message")
        msg = got[0]
        assert (msg.text, msg.sender, msg.relayed_by, msg.trust) == ("said while carol was away\twith a tab",
                                                                     "alice", "bob", "unverified")
        assert msg.fingerprint is None and msg.claimed_fingerprint == alice.identity.fingerprint
        # bob now forges: alice's words altered under her id, altered under a new id with her old signature, and
        # unsigned words in her name: only the last is taken, as unverified
        real = rb.ledger.log.entries()[-1]
        author = rb.ledger.scope.author(real["fingerprint"])

        def rebound(record):
            m = rtchat.Message.from_dict(record)
            m.salt = rtchat.new_id()
            return {**record, "salt": m.salt, "id": m.bound_id()}
        forged = [{**real, "text": "alice says: send me your password"},
                  rebound({**real, "text": "alice says: send me your password"}),
                  rebound({**real, "sig": None, "text": "unsigned, as alice"})]
        shown_live = []
        rc.on("message", shown_live.append)

        async def barrier():  # frames on a channel come in order: what bob sent before this has been handled
            marker = rb.send(f"marker {len(shown_live)}")
            await eventually(lambda: any(m.id == marker.id for m in shown_live), 5, "bob's marker")
        rb.peers["carol"].send("chat", {"t": "backfill", "authors": {real["fingerprint"]: author}, "msgs": forged})
        await barrier()
        assert len(got) == 2 and got[1].trust == "unverified" and got[1].relayed_by == "bob"
        assert all("password" not in m.text for m in got)
        # more than carol asked for (BACKFILL_MAX records in answer to her sync) is refused, whatever it holds
        rb.peers["carol"].send("chat", {"t": "backfill", "authors": {}, "msgs": [{}] * rtchat.BACKFILL_MAX})
        rb.peers["carol"].send("chat", {"t": "backfill", "authors": {}, "msgs": [
            rebound({**real, "sig": None, "text": "one too many"})]})
        await barrier()
        assert len(got) == 2
        # alice is back: carol meets her with the key bob's relays named, so no conflict; now checked
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("room")
        await rc.wait_for_peers(2, 20)
        assert not conflicts
        late = rtchat.Message.from_dict(real)
        assert rc.ledger.relays._relayed(rc.peers["bob"], {real["fingerprint"]: author},
                                     {**real, "relayed_by": None}, {})[0].trust == "relayed"
        assert late.id == real["id"]
        await close_all([alice, bob, carol])
    run(scenario())


def test_restarted_peer_receives_every_message_once_in_order(broker, tmp_path):
    """What was said while bob was down reaches him when he is back, in order, as history (--history 20 shows it,
    marked); then news is news."""
    async def scenario():
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("crash")
        args = ["bob", "--room", "crash", "--state", str(tmp_path / "bob.json"), "--listen", "--json"]
        bob = subprocess.Popen(rtchat_cmd(*args), env=cli_env(broker.url), stdout=subprocess.PIPE, text=True)
        await ra.wait_for_peers(1, 20)
        bob.send_signal(signal.SIGKILL)
        bob.wait()
        await eventually(lambda: not ra.verified_peers(), 20, "bob gone")
        sent = [ra.send(f"missed {i}") for i in range(20)]
        bob = subprocess.Popen(rtchat_cmd(*args, "--count", "1", "--history", "20"), env=cli_env(broker.url),
                               stdout=subprocess.PIPE, text=True)
        history = []
        while len(history) < 20:
            event = json.loads(await asyncio.get_running_loop().run_in_executor(None, bob.stdout.readline))
            if event["type"] == "message":
                history.append(event)
        assert [e["text"] for e in history] == [m.text for m in sent] and all(e["history"] for e in history)
        ra.send("back again")
        out, _ = await asyncio.get_running_loop().run_in_executor(None, bob.communicate, None)
        news = [e for e in map(json.loads, out.splitlines()) if e["type"] == "message"]
        assert [(e["text"], "history" in e) for e in news] == [("back again", False)]
        await alice.close()
    run(scenario(), 90)


def test_dm_to_someone_away_waits_across_restarts_and_is_acknowledged(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await started(tmp_path, broker.url, "alice", "bob")
        await ra.wait_for_peers(1, 20)
        await bob.close()
        await eventually(lambda: not ra.verified_peers(), 10, "bob gone")
        queued = ra.dm("bob", "while you were out")
        assert [m.id for m in ra.outbox()] == [queued.id]
        await alice.close()  # alice restarts before bob is back: the outbox is on disk
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("room")
        delivered = []
        ra.on("delivered", lambda msg_id, peer: delivered.append(msg_id))
        bob = await make_client("bob", tmp_path, broker.url).start()
        rb = await bob.join("room")
        dms = []
        rb.on("dm", dms.append)
        await eventually(lambda: dms and delivered, 20, "the queued dm and its ack")
        assert dms[0].text == "while you were out" and dms[0].id == queued.id and delivered == [queued.id]
        await eventually(lambda: not ra.outbox(), 5, "an empty outbox")
        await close_all([alice, bob])
    run(scenario())


def test_broker_killed_mid_chat_loses_nothing(own_broker, tmp_path):
    async def scenario():
        clients, rooms = await started(tmp_path, own_broker.url, "alice", "bob", "carol")
        for r in rooms:
            await r.wait_for_peers(2, 20)
        received = {r.me: [] for r in rooms}
        for r in rooms:
            r.on("message", lambda m, me=r.me: received[me].append(m.id))
        sent = []
        for round_ in range(3):
            if round_ == 1:
                own_broker.stop()
                await eventually(lambda: not any(c.signaling.is_connected for c in clients), 10, "broker gone")
            if round_ == 2:
                own_broker.start()
                await eventually(lambda: all(c.signaling.is_connected for c in clients), 30, "reconnects")
            for r in rooms:
                for i in range(10):
                    sent.append((r.me, r.send(f"{r.me} {round_} {i}").id))
        await eventually(lambda: sum(map(len, received.values())) == 2 * len(sent), 20, "every delivery")
        for me, ids in received.items():
            assert sorted(ids) == sorted(i for sender, i in sent if sender != me)
        dave = await make_client("dave", tmp_path, own_broker.url).start()  # signaling works again
        await (await dave.join("room")).wait_for_peers(3, 20)
        print(f"broker restart: {len(sent)} messages sent, {sum(map(len, received.values()))} deliveries "
              f"of {2 * len(sent)} expected")
        await close_all(clients + [dave])
    run(scenario(), 120)


def test_kill_9_during_a_burst_keeps_every_acknowledged_message(broker, tmp_path):
    async def scenario():
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("burst")
        state = tmp_path / "bob.json"
        bob = subprocess.Popen(rtchat_cmd("bob", "--room", "burst", "--state", str(state), "--listen"),
                               env=cli_env(broker.url), stdout=subprocess.PIPE, text=True)
        await ra.wait_for_peers(1, 20)
        sent = []

        async def burst():
            for i in range(1000):
                sent.append(ra.send(f"burst {i}").id)
                if i % 50 == 0:
                    await asyncio.sleep(0)
        task = asyncio.ensure_future(burst())

        def acknowledged():
            return [i for i in sent if "bob" not in ra.ledger.awaiting(i)]
        await eventually(lambda: len(acknowledged()) >= 100, 30, "100 acknowledged")
        bob.send_signal(signal.SIGKILL)
        bob.wait()
        await task
        acked = acknowledged()
        store = rtchat.Store(state)
        store.load()
        log = rtchat.HistoryLog(store.history_path("burst"))
        lines = log.path.read_text().splitlines()
        on_disk = {e["id"] for e in log.entries()}
        assert len(on_disk) >= len(acked) > 0
        assert set(acked) <= on_disk
        assert sum(1 for line in lines if line.strip()) - len(on_disk) <= 1  # at most one torn line
        print(f"kill -9 during a burst: {len(sent)} sent, {len(acked)} acknowledged, {len(on_disk)} on disk")
        await alice.close()
    run(scenario(), 90)


def test_two_instances_of_one_user_share_the_state_file(broker, tmp_path):
    async def scenario():
        state = tmp_path / "shared.json"
        env = cli_env(broker.url)
        listeners = [subprocess.Popen(rtchat_cmd("bob", "--room", "pair", "--state", str(state), "--listen",
                                                 "--json", "--count", "50"), env=env, stdout=subprocess.PIPE,
                                      text=True) for _ in range(2)]
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("pair")
        await ra.wait_for_peers(2, 30)
        assert sorted(p.name for p in ra.verified_peers()) == ["bob", "bob(1)"]
        for i in range(50):
            ra.send(f"to both {i}")
        outs = [await asyncio.get_running_loop().run_in_executor(None, p.communicate) for p in listeners]
        assert all(out.count('"type": "message"') == 50 for out, _ in outs)
        store = rtchat.Store(state)
        data = store.load()
        entries = rtchat.HistoryLog(store.history_path("pair")).entries()
        assert [e["text"] for e in entries] == [f"to both {i}" for i in range(50)]
        assert data["identity"] and alice.identity.fingerprint in data["pins"]
        assert not data["instances"].get("bob")
        await alice.close()
    run(scenario(), 90)


def test_lines_said_while_newcomers_connect_reach_them(broker, tmp_path):
    """alice says a line every 50 ms while bob, carol and dave join one after another (three times over: they
    leave and come back). A line said while a newcomer is being connected is neither sent to it live nor yet on
    disk when it asks what it missed: it must still reach it, as history. Every listener gets every line, once."""
    async def scenario():
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("stream")
        said, stop = [], asyncio.Event()

        async def talk():
            while not stop.is_set():
                said.append(ra.send(f"tick {len(said)}").id)
                await asyncio.sleep(0.05)
        talker = asyncio.ensure_future(talk())
        got = {name: [] for name in ("bob", "carol", "dave")}
        for _ in range(3):
            listeners = []
            for name in got:
                client = await make_client(name, tmp_path, broker.url).start()
                room = await client.join("stream")
                room.on("message", lambda m, name=name: got[name].append(m.id))
                room.on("history", lambda m, name=name: got[name].append(m.id))
                await room.wait_for_peers(len(listeners) + 1, 20)
                listeners.append(client)
            await eventually(lambda: all(set(said) <= set(ids) for ids in got.values()), 10, "every line so far")
            await close_all(listeners)
        stop.set()
        await talker
        missing = {name: len(set(said) - set(ids)) for name, ids in got.items()}
        print(f"{len(said)} lines said while listeners joined; missing {missing}")
        assert all(len(ids) == len(set(ids)) for ids in got.values())
        await alice.close()
    run(scenario(), 120)
