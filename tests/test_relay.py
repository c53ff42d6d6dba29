"""Relaying through members (issue 15, item 3): two members with no network path to each other chat through a
third they both reach, end to end. Real mosquitto, real aiortc peers on loopback; a pair is made pathless by
giving each side's offer or answer candidates nobody listens on (ICE then finds no pair, as between two symmetric
NATs without TURN). The NAT lab does it with real NATs (test_networks.py)."""
from __future__ import annotations

import io
import json
import re

from conftest import eventually, make_client, run

import rtchat


async def room_of(tmp_path, broker_url, names, room="relay", **options):
    clients = [await make_client(n, tmp_path, broker_url, **options.get(n, {})).start() for n in names]
    rooms = [await c.join(room) for c in clients]
    return clients, rooms


async def close_all(clients):
    for c in clients:
        await c.close()


def remote_names(room):
    return {r.name: r.via[0].name for r in room.relayed_peers() if r.via}


def test_chat_and_acks_go_through_a_member_both_reach(broker, tmp_path, pathless):
    """alice and bob have no path; carol reaches both. Their room messages reach each other through carol,
    signed by their author (trust 'relayed': the key pinned for the name) and shown via carol; the ack comes back
    the same way, signed by whoever acks; a direct message is sealed: carol's process sees no plaintext."""
    pathless.add("alice", "bob")

    async def scenario():
        clients, rooms = await room_of(tmp_path, broker.url, ["alice", "bob", "carol"])
        ra, rb, rc = rooms
        got_a, got_b, delivered = [], [], []
        ra.on("message", got_a.append)
        rb.on("message", got_b.append)
        rb.on("dm", got_b.append)
        ra.on("delivered", lambda msg_id, peer: delivered.append((msg_id, peer.name)))
        relay_frames = []
        original = rc.ledger.routes.on_relay
        rc.ledger.routes.on_relay = lambda peer, value: (relay_frames.append(rtchat.to_json(value)),
                                                         original(peer, value))
        await eventually(lambda: remote_names(ra) == {"bob": "carol"} and remote_names(rb) == {"alice": "carol"},
                         30, "alice and bob reached through carol")
        assert [p.name for p in await ra.wait_for_room(2, timeout=20)] == ["carol", "bob"]
        sent = ra.send("hello bob, through carol")
        await eventually(lambda: got_b, 10, "bob getting alice's line")
        msg = got_b[0]
        assert (msg.sender, msg.text, msg.relayed_by, msg.id, msg.history) == (
            "alice", "hello bob, through carol", "carol", sent.id, False)
        assert msg.trust in ("relayed", "unverified") and msg.fingerprint or msg.claimed_fingerprint
        assert await ra.flush(10) and ra.unacknowledged() == set()
        rb.send("hi alice")
        await eventually(lambda: got_a, 10, "alice getting bob's line")
        assert (got_a[0].sender, got_a[0].relayed_by) == ("bob", "carol")
        secret = "the cake is a lie 4c1d"
        dm = ra.dm("bob", secret)
        await eventually(lambda: any(m.kind == "dm" for m in got_b), 10, "bob getting alice's dm")
        assert [(m.text, m.to, m.relayed_by) for m in got_b if m.kind == "dm"] == [(secret, "bob", "carol")]
        await eventually(lambda: (dm.id, "bob") in delivered, 10, "the dm acknowledged by bob")
        assert relay_frames and not any(secret in frame for frame in relay_frames)
        assert any('"t":"box"' in frame for frame in relay_frames)
        await close_all(clients)
    run(scenario(), 90)


def test_a_member_that_leaves_or_refuses_is_replaced_by_another(broker, tmp_path, pathless):
    """carol does not relay (--no-relay: Client(relay=False)) and says so when asked anyway; dave and erin do.
    alice's line goes through one of them; when that one leaves, the next line goes through the other at once,
    and what was not acknowledged yet goes again."""
    pathless.add("alice", "bob")

    async def scenario():
        clients, rooms = await room_of(tmp_path, broker.url, ["alice", "bob", "carol", "dave", "erin"],
                                       carol={"relay": False})
        ra, rb, rc, rd, re_ = rooms
        got_b, refused, routes = [], [], []
        rb.on("message", got_b.append)
        ra.on("relay-refused", lambda peer, why: refused.append((peer.name, why)))
        ra.on("relayed", lambda name, via: routes.append((name, via)))
        def through() -> set[str]:
            return {p.name for r in ra.relayed_peers() for p in r.via}
        await eventually(lambda: through() == {"dave", "erin"} and remote_names(rb), 30, "routes through both")
        assert set(remote_names(ra)) == {"bob"}   # and not through carol: she said she does not relay
        # asked anyway, carol refuses, with the reason
        ra.peers["carol"].send("chat", {"t": "relay", "to": ["bob"], "d": {"t": "msg", "m": {}}})
        await eventually(lambda: ("carol", "off") in refused, 10, "carol's refusal")
        first = remote_names(ra)["bob"]
        ra.send("one")
        await eventually(lambda: [m.text for m in got_b] == ["one"], 10, "the first line")
        assert got_b[0].relayed_by == first and await ra.flush(10)
        leaving = next(c for c in clients if c.name == first)
        await leaving.close()
        other = ({"dave", "erin"} - {first}).pop()
        await eventually(lambda: first not in ra.peers and remote_names(ra).get("bob") == other, 15,
                         f"{first} gone, and the route through {other}")
        assert ("bob", other) in routes
        ra.send("two")
        await eventually(lambda: [m.text for m in got_b] == ["one", "two"], 10, "the second line")
        assert got_b[1].relayed_by == other
        assert await ra.flush(10), ra.unacknowledged()
        await close_all([c for c in clients if c is not leaving])
    run(scenario(), 120)


def test_the_chat_shows_relayed_peers_and_lines_and_json_says_it(broker, tmp_path, pathless):
    """alice at a chat: bob's line reads '(via carol)', /peers says 'relayed via carol', and /msg bob goes through
    carol, delivered on bob's ack. A --json listener's output has the 'relayed' event and the relayed_by field."""
    pathless.add("alice", "bob")

    async def scenario():
        clients = [await make_client(n, tmp_path, broker.url).start() for n in ("alice", "bob", "carol")]
        registry = rtchat.Registry()
        registry.collect(vars(rtchat), "core")
        out, json_out = io.StringIO(), io.StringIO()
        app = rtchat.App(clients[0], registry, rtchat.Printer("chat", False, out, out))
        listener = rtchat.App(clients[1], registry, rtchat.Printer("json", False, json_out, io.StringIO()))
        await app.switch_room("relay")
        await listener.switch_room("relay")
        await clients[2].join("relay")
        await eventually(lambda: remote_names(app.room) == {"bob": "carol"} and remote_names(listener.room), 30,
                         "the routes")
        listener.room.send("hi from bob")
        await eventually(lambda: "hi from bob" in out.getvalue(), 10, "bob's line at alice")
        assert re.search(r"<bob> \(via carol(, unverified)?\) hi from bob", out.getvalue()), out.getvalue()
        assert "-!- bob relayed via carol (no direct connection)" in out.getvalue()
        start = len(out.getvalue())
        await app.run_line("/peers")
        peers = out.getvalue()[start:]
        assert re.search(r"^bob +relayed via carol", peers, re.M) and re.search(r"^carol +verified", peers, re.M), \
            peers
        await app.run_line("/msg bob through carol")
        await eventually(lambda: "delivered to bob" in out.getvalue(), 10, "the dm delivered")
        events = [json.loads(line) for line in json_out.getvalue().splitlines()]
        relayed = [e for e in events if e["type"] == "relayed"]
        assert relayed and relayed[0]["from"] == "alice" and relayed[0]["via"] == "carol"
        dm = next(e for e in events if e["type"] == "dm")
        assert (dm["from"], dm["text"], dm["relayed_by"], dm["to"]) == ("alice", "through carol", "carol", "bob")
        for client in clients:
            await client.close()
    run(scenario(), 60)


def test_a_room_forming_relays_nobody_who_is_still_connecting(broker, tmp_path, monkeypatch):
    """Five members join at once, every pair with a path: while they connect, each hears from the others whom
    they reach, but a member with whom a session is being set up is not taken as reached through others (no
    'relayed' event, nothing relayed). Each member's keys go to a peer once; after that, its fingerprint."""
    told: dict[tuple[int, str], int] = {}
    send = rtchat.Peer.send

    def counting(peer, label, value):
        if isinstance(value, dict) and value.get("t") == "reach":
            for name, entry in value["peers"].items():
                told[(id(peer), name)] = told.get((id(peer), name), 0) + ("key" in entry)
        return send(peer, label, value)
    monkeypatch.setattr(rtchat.Peer, "send", counting)

    async def scenario():
        clients, rooms = await room_of(tmp_path, broker.url, ["alice", "bob", "carol", "dave", "erin"])
        relayed = []
        for room in rooms:
            room.on("relayed", lambda name, via, me=room.me: relayed.append((me, name, via)))
        for room in rooms:
            await room.wait_for_room(4, timeout=30)
        assert all(len(room.verified_peers()) == 4 and not room.relayed_peers() for room in rooms)
        await eventually(lambda: all(r.ledger.routes.sizes()["told"] == 4 * 3 for r in rooms), 10,
                         "each told by the four others whom they reach (the three others each)")
        assert relayed == [] and not any(room.relayed_peers() for room in rooms)
        assert told and max(told.values()) == 1, told
        await close_all(clients)
    run(scenario(), 60)


def test_a_line_not_acked_through_a_member_goes_on_a_direct_session_when_one_comes(broker, tmp_path, pathless,
                                                                                    monkeypatch):
    """carol passes nothing on (she says she relays, but drops); alice's line to bob waits for his ack. The next
    try finds a path: the line goes on the new direct session, and bob acks it there."""
    pathless.add("alice", "bob")
    monkeypatch.setattr(rtchat, "RETRY_AFTER_S", 2.0)

    async def scenario():
        clients, (ra, rb, rc) = await room_of(tmp_path, broker.url, ["alice", "bob", "carol"])
        got_b = []
        rb.on("message", got_b.append)
        rc.ledger.routes.on_relay = lambda peer, value: None
        await eventually(lambda: remote_names(ra) == {"bob": "carol"}, 30, "bob reached through carol")
        sent = ra.send("are you there?")
        pathless.remove("alice", "bob")
        await eventually(lambda: ra.peers.get("bob") and ra.peers["bob"].is_verified, 30, "a direct session")
        await eventually(lambda: [m.text for m in got_b] == ["are you there?"], 10, "the line, directly")
        assert got_b[0].relayed_by is None and await ra.flush(10) and not ra.ledger.awaiting(sent.id)
        assert ra.ledger.routes.sizes()["pending"] == 0
        await close_all(clients)
    run(scenario(), 60)
