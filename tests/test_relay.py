"""Relaying through members (issue 15, item 3): two members with no network path to each other chat through a
third they both reach, end to end. Real mosquitto, real aiortc peers on loopback; a pair is made pathless by
giving each side's offer or answer candidates nobody listens on (ICE then finds no pair, as between two symmetric
NATs without TURN). The NAT lab does it with real NATs (test_networks.py)."""
from __future__ import annotations

import asyncio
import re

import pytest
from conftest import eventually, make_client, run

import rtchat

NOWHERE = 9   # the discard port: nothing listens there on loopback


@pytest.fixture
def pathless(monkeypatch):
    """pathless.add("alice", "bob"): the offers and answers between these two carry only candidates nobody
    listens on, so they reach each other by signaling but find no network path."""
    pairs: set[frozenset] = set()
    publish = rtchat.RoomSignaling.publish
    monkeypatch.setattr(rtchat, "NO_PATH_AFTER_S", 1.0)
    monkeypatch.setattr(rtchat, "RETRY_AFTER_S", 600.0)

    def blocked(self, subtopic, data, to=None, compact=False, topic=None):
        if subtopic in ("RTCOffer", "RTCAnswer") and frozenset((bare(self.me), bare(to or ""))) in pairs:
            holder = data["offer"] if subtopic == "RTCOffer" else data
            sdp = holder["localDescription"]["sdp"]
            holder["localDescription"] = {**holder["localDescription"], "sdp": re.sub(
                r"(a=candidate:\S+ \d+ \w+ \d+ \S+ )(\d+)", lambda m: f"{m[1]}{NOWHERE}", sdp)}
        return publish(self, subtopic, data, to=to, compact=compact, topic=topic)

    def bare(name):
        return rtchat.bare_name(name)
    monkeypatch.setattr(rtchat.RoomSignaling, "publish", blocked)

    class Pairs:
        @staticmethod
        def add(a: str, b: str) -> None:
            pairs.add(frozenset((a, b)))
    return Pairs


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
        # alice and bob meet carol first, so their keys are pinned at each other's ends by a direct meeting ...
        clients, rooms = await room_of(tmp_path, broker.url, ["alice", "bob", "carol"])
        alice, bob, carol = clients
        ra, rb, rc = rooms
        got_a, got_b, delivered, seen_by_carol = [], [], [], []
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
