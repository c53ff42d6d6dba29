"""Large rooms: past 2×D rtchat.py members a room runs on gossip. Real clients and rtchat.py processes on a real
mosquitto, with a small D (--max-peers 3: a room of seven is large) so that CI can afford the room."""
import asyncio
import io
import signal
import subprocess

from support import Proc, Sniffer, cli_env, eventually, make_client, rtchat_cmd, run

import rtchat

D = 3          # sessions each member keeps with other members: a room of more than 2×D = 6 is large
MEMBERS = 7


async def large_room(tmp_path, broker, count: int = MEMBERS, **options) -> list[rtchat.Client]:
    """count clients in room 'big' with max_peers=D, once each knows every other member."""
    clients = [await make_client(f"u{i}", tmp_path, broker.url, max_peers=D, **options).start() for i in range(count)]
    for client in clients:
        await client.join("big")
    rooms = [c.rooms["big"] for c in clients]
    await eventually(lambda: all(r.large and len(r.overlay.members) == count - 1 for r in rooms), 60,
                     "every member large and knowing the others")
    return clients


def rtchat_sessions(room: rtchat.Room) -> list[str]:
    return sorted(p.name for p in room.peers.values() if p.is_rtchat_py and p.state not in ("seen", "closed"))


async def settled(rooms: list[rtchat.Room]) -> None:
    """Until sessions beyond the neighbours (set up to ask, or from before the room was large) are closed."""
    await eventually(lambda: all(0 < len(r.overlay.neighbors()) <= len(rtchat_sessions(r)) <= D for r in rooms), 40,
                     "at most D sessions each, and neighbours")


def test_a_room_past_twice_d_keeps_d_sessions_each_and_reaches_everyone_once_in_order(broker, tmp_path):
    async def scenario():
        clients = await large_room(tmp_path, broker)
        rooms = [c.rooms["big"] for c in clients]
        try:
            await settled(rooms)
            got = {r.me: [] for r in rooms}
            for r in rooms:
                r.on("message", lambda m, r=r: got[r.me].append((m.sender, m.text, m.history)))
            said = [rooms[0].send(f"line {i}") for i in range(5)]
            await eventually(lambda: all(len(got[r.me]) >= 5 for r in rooms[1:]), 30, "five lines everywhere")
            assert await rooms[0].flush(20) and not rooms[0].unacknowledged()   # acked end to end by all six
            await asyncio.sleep(0.5)   # any duplicate would have come by now
            for r in rooms[1:]:
                assert got[r.me] == [("u0", f"line {i}", False) for i in range(5)], r.me  # once each, in order, news
            assert {m.id for m in said} <= {e["id"] for e in rooms[3].ledger.log.entries()}  # kept on disk

            # A direct message to a member we have no session with: sealed, by gossip, to it alone.
            far = next(r for r in rooms[1:] if r.me not in rtchat_sessions(rooms[0]))
            dms, delivered = [], asyncio.Event()
            for r in rooms[1:]:
                r.on("dm", lambda m, r=r: dms.append((r.me, m.sender, m.text)))
            rooms[0].on("delivered", lambda msg_id, peer: delivered.set())
            rooms[0].dm(far.me, "just you")
            await asyncio.wait_for(delivered.wait(), 20)
            await asyncio.sleep(0.3)
            assert dms == [(far.me, "u0", "just you")]
        finally:
            for client in clients:
                await client.close()
    run(scenario(), 150)


def test_a_newcomer_to_a_large_room_hears_from_a_few_members_not_all(broker, tmp_path):
    """In a full mesh every member answers a newcomer's announcement; in a large room about JOIN_CONTACTS do (each
    with that chance), and the newcomer joins through them: a join costs the broker a few deliveries, not N."""
    async def scenario():
        clients = await large_room(tmp_path, broker, count=9)
        await settled([c.rooms["big"] for c in clients])
        clients[2].rooms["big"].send("said before the newcomer came")
        await eventually(lambda: all(len(c.rooms["big"].history(5)) == 1 for c in clients), 20, "the line everywhere")
        sniffer = Sniffer(broker.tcp_port)
        newcomer = await make_client("newcomer", tmp_path, broker.url, max_peers=D).start()
        started = asyncio.get_running_loop().time()
        room = await newcomer.join("big")
        try:
            await eventually(lambda: room.large and len(room.overlay.members) == len(clients), 60,
                             "the newcomer knowing the room")
            heard = [(topic, rtchat.decode_envelope(payload) or {}) for _, topic, payload in
                     sniffer.window(room.topic, started, asyncio.get_running_loop().time())]
            answers = {e.get("sender") for topic, e in heard if topic == room.network.inbox
                       and e.get("subtopic") == "connect"}
            print(f"the newcomer's announcement was answered by {len(answers)} of {len(clients)} members")
            assert 0 < len(answers) < len(clients)
            # History is compared with the first members met only (SYNC_PEERS), and what was said before comes.
            await eventually(lambda: [m.text for m in room.history(5)] == ["said before the newcomer came"], 20,
                             "history passed on to the newcomer")
            got = []
            room.on("message", lambda m: got.append(m.text))
            clients[4].rooms["big"].send("welcome")
            await eventually(lambda: got == ["welcome"], 20, "a line reaching the newcomer")
        finally:
            sniffer.stop()
            for client in [*clients, newcomer]:
                await client.close()
    run(scenario(), 180)


def test_who_lists_every_member_and_peers_counts_them(broker, tmp_path):
    async def scenario():
        clients = await large_room(tmp_path, broker)
        out = io.StringIO()
        registry = rtchat.Registry()
        registry.collect(vars(rtchat), "core")
        app = rtchat.App(clients[0], registry, rtchat.Printer("chat", False, out, out))
        app.room = clients[0].rooms["big"]
        try:
            await settled([c.rooms["big"] for c in clients])
            await app.run_line("/who")
            who = out.getvalue()
            assert f"{MEMBERS} in #big: you (u0)" in who
            assert all(f"u{i}" in who for i in range(1, MEMBERS))
            assert "by gossip: " in who
            out.seek(0)
            out.truncate()
            await app.run_line("/peers")
            peers = out.getvalue()
            assert "#big is a large room:" in peers and "reached by gossip (/who lists everyone)" in peers
            # A member that leaves says so: it is gone from everyone's /who at once.
            await clients[-1].close()
            await eventually(lambda: all(f"u{MEMBERS - 1}" not in c.rooms["big"].overlay.members
                                         for c in clients[:-1]), 30, "the member that left gone from the room")
            # A direct message to it waits in the outbox, and goes out when it is back.
            away = f"u{MEMBERS - 1}"
            if not clients[0].trust.pins_for(away):
                clients[0].trust.pin(away, clients[-1].identity.public_key_string)
            queued = []
            app.room.on("queued", queued.append)
            app.room.dm(away, "while you were away")
            assert queued
            clients[-1] = await make_client(away, tmp_path, broker.url, max_peers=D).start()
            back = await clients[-1].join("big")
            got = []
            back.on("dm", lambda m: got.append(m.text))
            await eventually(lambda: got == ["while you were away"], 40, "the direct message that waited")
        finally:
            for client in clients:
                await client.close()
    run(scenario(), 180)


def test_forged_gossip_stops_at_the_first_member(broker, tmp_path):
    """mallory is a member and a neighbour of some: what it forges is dropped where it lands, never passed on."""
    async def scenario():
        clients = await large_room(tmp_path, broker)
        rooms = [c.rooms["big"] for c in clients]
        mallory = rooms[-1]
        victim_name = "u0"
        try:
            await settled(rooms)  # acks go back the way lines came: not through sessions about to be closed
            await eventually(lambda: mallory.overlay.neighbors(), 20, "mallory has a neighbour")
            neighbor = mallory.peers[mallory.overlay.neighbors()[0]]
            target = next(r for r in rooms if r.me == neighbor.name)
            seen = []
            for r in rooms[:-1]:
                r.on("message", lambda m: seen.append(m.text))
            # 1. A line in u0's name whose words were changed after u0 signed them.
            genuine = rooms[0].ledger.relays._relay_record(rtchat.own_message(
                rooms[0].ledger.scope, "genuine").record(), False, {})[0]
            genuine["sig"] = rooms[0].identity.sign_message(rtchat.Message.from_dict(genuine).signed_part(
                rooms[0].topic))
            altered = {**genuine, "text": "altered"}
            author = rooms[0].ledger.scope.author(rooms[0].identity.fingerprint)
            # 2. A line in u0's name signed by mallory's key, claiming u0's key.
            forged = rtchat.own_message(mallory.ledger.scope, "forged")
            record = {**mallory.ledger.relays._relay_record(forged.record(), False, {})[0], "from": victim_name}
            # 3. u0's presence signed by mallory.
            ts = rtchat.now_ms()
            presence = {"t": "here", "n": "ghost", "ts": ts, "a": author,
                        "sig": mallory.identity.sign_message(rtchat.signed_bytes("presence", mallory.topic, "ghost",
                                                                                 ts, "here"))}
            frames = [("altered", {"t": "msg", "m": altered, "a": author, "e": "x", "n": 1}),
                      (record["id"], {"t": "msg", "m": record, "a": author, "e": "x", "n": 2}),
                      (rtchat.presence_id(mallory.topic, "ghost", ts, "here"), presence),
                      ("big", {"t": "msg", "m": {**genuine, "text": "x" * 70_000}, "a": author})]
            for msg_id, payload in frames:
                neighbor.send("chat", {"t": "g", "g": {"t": "gossip", "id": msg_id, "r": 1, "d": payload}})
            # 4. An ack for u0's next line in the name of a member that did not sign it.
            line = rooms[0].send("acks must be signed")
            await eventually(lambda: "acks must be signed" in seen, 20, "a genuine line everywhere")
            await asyncio.sleep(1.0)
            assert "altered" not in seen and "forged" not in seen and "genuine" not in seen
            assert all(not r.overlay.gossip.tree.has_seen("altered") for r in rooms[:-1])
            assert all(not r.overlay.gossip.tree.has_seen(record["id"]) for r in rooms[:-1])
            assert all("ghost" not in r.overlay.members for r in rooms[:-1])
            assert target.overlay.gossip.tree.has_seen(line.id)
            sig = mallory.identity.sign_message(rtchat.signed_bytes("relay-ack", mallory.topic, "u1", "u0",
                                                                    [line.id]))
            waiting = rooms[0].ledger.awaiting(line.id)
            forger = next(p for p in mallory.verified_peers() if p.name == neighbor.name)
            forger.send("chat", {"t": "gack", "acks": [{"to": "u0", "from": "u1", "ids": [line.id], "sig": sig}]})
            await asyncio.sleep(0.5)
            assert rooms[0].ledger.awaiting(line.id) <= waiting
            assert await rooms[0].flush(20)   # the genuine acks still come
        finally:
            for client in clients:
                await client.close()
    run(scenario(), 150)


def test_a_pipe_reaches_a_large_room_of_processes_and_a_killed_member_is_named(broker, tmp_path):
    """Seven listeners with --max-peers 3: a pipe's line is news to every one, acked by all; after two are killed,
    the next pipe still reaches the five others and exits 75 naming the two (nobody said they left)."""
    env = cli_env(broker.url, RTCHAT_MAX_PEERS=str(D))
    listeners = [Proc([f"l{i}", "--room", "big", "--listen", "--json", "--state", str(tmp_path / f"l{i}.json")], env)
                 for i in range(MEMBERS)]
    try:
        for proc in listeners:
            proc.said("listening", 60)

        def pipe(name: str, line: str) -> subprocess.CompletedProcess:
            return subprocess.run(rtchat_cmd(name, "--room", "big", "--state", str(tmp_path / f"{name}.json"),
                                             "--timeout", "60"),
                                  input=line + "\n", env=env, capture_output=True, text=True, timeout=120)
        # The listeners know they are a large room once a pipe is connected; wait until all are.
        first = pipe("p1", "hello big room")
        assert first.returncode == 0, first.stderr
        assert f"delivered 1 message(s) to {MEMBERS} peer(s)" in first.stderr
        for proc in listeners:
            proc.wait_for(lambda p: [m["text"] for m in p.messages()] == ["hello big room"], 30, "the line, once")
        killed = listeners[1:3]
        for proc in killed:
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
        second = pipe("p2", "after the crash")
        assert second.returncode == 75, second.stderr
        assert "not confirmed delivered by l1, l2" in second.stderr
        for proc in [listeners[0], *listeners[3:]]:
            proc.wait_for(lambda p: "after the crash" in [m["text"] for m in p.messages()], 60, "the second line")
    finally:
        for proc in listeners:
            proc.stop()
