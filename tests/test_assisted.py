"""Assisted signaling (issue 15, item 4): offers, answers and announcements between two members travel through a
member both are connected to, so a room keeps forming links while the broker is down or loses messages.

Real mosquitto, real aiortc peers, loopback only. A LossyLink (tests/support.py) stands between a client and the
broker where the broker is to lose that client's messages. The attacks on the frame (a member that alters,
replays, drops, floods or forges what it passes on; a browser or an unverified peer sending the frame) use the
attacker's tools of test_attacks.py.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import pytest
from conftest import eventually, make_client, run
from support import LossyLink
from test_attacks import Mallory, Wire, attach, envelope

import rtchat


async def join_all(clients: list[rtchat.Client], room: str = "test", secret: str | None = None) -> list[rtchat.Room]:
    for client in clients:
        await client.start()
    return [await client.join(room, secret) for client in clients]


async def close_all(*things) -> None:
    for thing in things:
        await thing.close()


def heard(room: rtchat.Room) -> list[str]:
    said: list[str] = []
    room.on("message", lambda msg: said.append(msg.text))
    return said


@contextlib.asynccontextmanager
async def cut_off(broker, tmp_path, secret: str | None = None, **carol):
    """alice, bob and carol in a room; then alice's and bob's broker stops passing their messages, so that only
    carol hears the broker (and a newcomer's announcement). Yields (clients, rooms, links); closes them all."""
    links = {name: await LossyLink(broker.tcp_port).start() for name in ("alice", "bob")}
    clients = [make_client("alice", tmp_path, links["alice"].url), make_client("bob", tmp_path, links["bob"].url),
               make_client("carol", tmp_path, broker.url, **carol)]
    rooms = await join_all(clients, secret=secret)
    try:
        for room in rooms:
            await room.wait_for_peers(2, 20)
        for link in links.values():
            link.drop = 1.0
        yield clients, rooms, links
    finally:
        await close_all(*clients, *links.values())


async def newcomer(clients: list[rtchat.Client], name: str, tmp_path, broker,
                   secret: str | None = None) -> rtchat.Room:
    """name joins the room on the broker itself (and is closed with the others)."""
    client = make_client(name, tmp_path, broker.url)
    clients.append(client)
    return (await join_all([client], secret=secret))[0]


async def chat_both_ways(newcomer: rtchat.Room, others: list[rtchat.Room]) -> None:
    """The newcomer and each of the others hear each other, directly, once both sides have verified each other."""
    for room in others:
        await room.wait_for_peer(newcomer.me, 20)
        await newcomer.wait_for_peer(room.me, 20)
    theirs = heard(newcomer)
    ours = {room.me: heard(room) for room in others}
    newcomer.send(f"hello from {newcomer.me}")
    for room in others:
        room.send(f"hello from {room.me}")
    await eventually(lambda: all(f"hello from {newcomer.me}" in said for said in ours.values())
                     and all(f"hello from {room.me}" in theirs for room in others), 20, "chat both ways")


@pytest.mark.parametrize("secret", [None, "sealed-secret"])
def test_newcomer_meets_everyone_through_a_member_after_the_broker_dies(own_broker, tmp_path, secret):
    """alice, bob and carol in a room; alice's and bob's broker stops passing their messages (dave's announcement
    reaches carol only); dave joins, connects to carol, and the broker is killed. dave ends up verified with alice
    and bob over direct links whose offers and answers carol passed on, and they chat both ways; in a sealed room
    too, where what carol passes on is sealed as on the broker."""
    async def scenario():
        async with cut_off(own_broker, tmp_path, secret) as (clients, rooms, links):
            rd = await newcomer(clients, "dave", tmp_path, own_broker, secret)
            await rd.wait_for_peer("carol", 20)
            own_broker.stop()
            await rd.wait_for_peers(3, 30)
            ra, rb, rc = rooms
            assert all(p.channel_bound for p in rd.verified_peers())
            await eventually(lambda: all(r.peers.get("dave") and r.peers["dave"].is_verified for r in (ra, rb)), 10,
                             "alice and bob verified dave")
            assert links["alice"].dropped and links["bob"].dropped  # the broker told them nothing of dave
            await chat_both_ways(rd, [ra, rb, rc])
            assert rc.assisted.counts["passed"] >= 2, rc.assisted.counts
            assert ra.assisted.counts["received"] and rb.assisted.counts["received"], (ra.assisted.counts,
                                                                                        rb.assisted.counts)
    run(scenario(), 120)


def test_a_newcomer_who_offers_hears_of_members_through_a_member(own_broker, tmp_path):
    """The same cut-off for alice and bob, with a newcomer whose name sorts first (aaron: he offers to them). They
    hear of him from carol, and tell him they are here through carol too, so that he offers: each of their
    sessions with him begins with his offer, not with theirs after waiting for it."""
    async def scenario():
        async with cut_off(own_broker, tmp_path) as (clients, rooms, _):
            begun: dict[str, list[str]] = {"alice": [], "bob": []}
            for room in rooms[:2]:
                room.negotiation.on("phase", lambda name, step, me=room.me: begun[me].append(step)
                                    if name == "aaron" and step in ("offering", "offered") else None)
            ro = await newcomer(clients, "aaron", tmp_path, own_broker)
            await ro.wait_for_peers(3, 30)
            await chat_both_ways(ro, rooms)
            assert begun == {"alice": ["offered"], "bob": ["offered"]}, begun
    run(scenario(), 120)


def test_a_broken_link_is_formed_again_through_a_member_while_the_broker_is_down(own_broker, tmp_path):
    """alice, bob and carol in a room; the broker is killed, then the link between alice and bob breaks. Their
    announcements go through carol, and they connect again, directly."""
    async def scenario():
        clients = [make_client(name, tmp_path, own_broker.url) for name in ("alice", "bob", "carol")]
        ra, rb, rc = await join_all(clients)
        try:
            for room in (ra, rb, rc):
                await room.wait_for_peers(2, 20)
            own_broker.stop()
            await eventually(lambda: not any(c.signaling.is_connected for c in clients), 20, "the broker gone")
            old = ra.peers["bob"]
            old.close("link broken")
            await eventually(lambda: ra.peers.get("bob") not in (None, old) and ra.peers["bob"].is_verified
                             and rb.peers.get("alice") is not None and rb.peers["alice"].is_verified, 30,
                             "alice and bob connected again")
            await chat_both_ways(ra, [rb])
        finally:
            await close_all(*clients)
    run(scenario(), 120)


def test_no_relay_member_passes_nothing_on(own_broker, tmp_path):
    """The same room with carol refusing to pass anything on (--no-relay): dave meets carol only, and carol counts
    what she refused."""
    async def scenario():
        async with cut_off(own_broker, tmp_path, relay=False) as (clients, rooms, _):
            rd = await newcomer(clients, "dave", tmp_path, own_broker)
            await rd.wait_for_peer("carol", 20)
            rc = rooms[2]
            await eventually(lambda: rc.assisted.counts["refused-no-relay"] >= 1, 10, "carol refusing to pass on")
            assert rc.assisted.counts["passed"] == 0
            assert not any(r.peers.get("dave") for r in rooms[:2])
            assert [p.name for p in rd.verified_peers()] == ["carol"]
    run(scenario(), 120)


def test_no_relay_on_the_command_line():
    assert rtchat.parse_args(["carol", "--no-relay", "--listen"]).no_relay is True
    assert rtchat.parse_args(["carol", "--listen"]).no_relay is False


def test_signaling_keeps_working_with_a_lossy_broker(own_broker, tmp_path):
    """alice, bob and carol in a room; then alice's and bob's broker loses half of what they publish and half of
    what they should hear (seeded), and dave joins: he meets all three, alice and bob through the broker where it
    let their signaling through, else through carol."""
    async def scenario():
        links = [await LossyLink(own_broker.tcp_port, seed=n).start() for n in range(2)]
        clients = [make_client("alice", tmp_path, links[0].url), make_client("bob", tmp_path, links[1].url),
                   make_client("carol", tmp_path, own_broker.url), make_client("dave", tmp_path, own_broker.url)]
        rooms = await join_all(clients[:3])
        try:
            for room in rooms:
                await room.wait_for_peers(2, 20)
            for link in links:
                link.drop = 0.5
            rooms += await join_all(clients[3:])
            await rooms[3].wait_for_peers(3, 30)
            assert links[0].dropped + links[1].dropped > 0
            await chat_both_ways(rooms[3], rooms[:3])
        finally:
            await close_all(*clients, *links)
    run(scenario(), 120)


# -- attacks ------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])   # the attacker's own aiortc peers too


def signal_frame(payload: bytes, to: str | None = None) -> dict:
    return {"t": rtchat.SIGNAL_FRAME, "p": base64.b64encode(payload).decode(), **({"to": to} if to else {})}


def hostile(room: rtchat.Room) -> list[dict]:
    """The member passes nothing on for anyone: what it is asked to pass on is kept, for the attacker."""
    kept: list[dict] = []
    room.assisted.on_frame = lambda peer, label, value: kept.append(value)
    return kept


def test_a_member_cannot_alter_replay_forge_or_flood_what_it_passes_on(broker, tmp_path):
    """alice, dave and mallory, a member verified by both, in a room. mallory keeps what alice asks it to pass on
    (her announcement) and sends dave: that envelope altered (dropped as forged), the genuine one twice (the second is
    a replay), alice's own offer to dave sniffed on the broker (a copy: ignored), an offer and an unload in alice's
    name signed with its own key or none (forged), and a flood, partly oversized or malformed, for dave and to pass
    on to alice (dave takes and passes on only its budget). dave's session with alice stays as it was."""
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        clients = [make_client(name, tmp_path, broker.url) for name in ("alice", "dave", "mallory")]
        ra, rd, rm = await join_all(clients, "assist-a")
        kept = hostile(rm)
        try:
            for room in (ra, rd, rm):
                await room.wait_for_peers(2, 20)
            def announced_by_alice() -> list[bytes]:
                payloads = [base64.b64decode(f["p"]) for f in kept if f.get("to") == "*"]
                return [p for p in payloads if rtchat.decode_envelope(p)["sender"] == "alice"]
            await eventually(announced_by_alice, 10, "alice's announcement to pass on")
            alice_at_dave, to_dave = rd.peers["alice"], rm.peers["dave"]
            genuine = announced_by_alice()[0]
            env = rtchat.decode_envelope(genuine)
            assert env["subtopic"] == "connect"
            drops = dict(rd.gate.drops)

            altered = rtchat.encode_envelope({**env, "data": {**env["data"], "inbox": "0123456789abcdef"}})
            to_dave.send("chat", signal_frame(altered))
            await eventually(lambda: rd.gate.drops["forged"] > drops.get("forged", 0), 10, "the altered one dropped")

            for _ in range(2):
                to_dave.send("chat", signal_frame(genuine))
            await eventually(lambda: rd.gate.drops["replay"] > drops.get("replay", 0), 10, "the replay dropped")

            offers = wire.captured(rd.topic, "alice", "RTCOffer", "dave")
            assert offers, "alice's offer to dave on the broker"
            copies = rd.gate.drops.copy()
            to_dave.send("chat", signal_frame(offers[0][0]))

            info = {"client": rtchat.CLIENT_TAG, "inbox": "0123456789abcdef"}
            own = clients[2].identity
            sdp = offers[0][1]["data"]["offer"]["localDescription"]["sdp"]
            forged = [envelope("alice", "RTCOffer", {"userInfo": info, "offer": {
                          "localDescription": {"type": "offer", "sdp": sdp}, "target": "dave"}},
                          identity=own, topic=rd.topic, compact=True),
                      envelope("alice", "unload", "disconnecting", identity=own, topic=rd.topic, compact=True),
                      envelope("alice", "unload", "disconnecting")]
            for payload in forged:
                to_dave.send("chat", signal_frame(payload))
            await eventually(lambda: rd.gate.drops["forged"] >= copies["forged"] + 3, 10, "the forgeries dropped")
            assert rd.gate.drops["replay"] == copies["replay"]  # the sniffed offer was a copy, not a replay

            before, passed = dict(rd.assisted.counts), rd.assisted.counts["passed"]
            started = time.monotonic()
            for n in range(300):
                junk = rtchat.encode_envelope({"sender": f"x{n}", "timestamp": rtchat.now_ms(),
                                               "subtopic": "connect", "data": {}})
                to_dave.send("chat", signal_frame(junk, "alice" if n % 2 else None))
            to_dave.send("chat", {"t": rtchat.SIGNAL_FRAME, "p": "A" * (rtchat.MAX_ASSISTED_BYTES * 2)})
            to_dave.send("chat", {"t": rtchat.SIGNAL_FRAME, "p": "not base64!", "to": None})
            to_dave.send("chat", {"t": rtchat.SIGNAL_FRAME, "p": 5, "to": "\x1b[2Jalice"})
            await eventually(lambda: sum(rd.assisted.counts.values()) - sum(before.values()) >= 303, 10, "the flood")
            budget = rtchat.SIGNAL_FRAME_BUDGET[1] + rtchat.SIGNAL_FRAME_BUDGET[0] * (time.monotonic() - started)
            taken = rd.assisted.counts["passed"] - passed + rd.assisted.counts["received"] - before["received"]
            assert taken <= budget, (taken, budget)  # frames passed on, and envelopes fed to dave's gate
            assert rd.assisted.counts["refused-rate"] - before.get("refused-rate", 0) >= 300 - budget
            assert rd.assisted.counts["refused-malformed"] - before.get("refused-malformed", 0) >= 2
            assert rd.assisted.sizes()["carriers"] <= rtchat.MAX_SEEN_PEERS  # the flood's names
            assert rd.peers["alice"] is alice_at_dave and alice_at_dave.is_verified
            await chat_both_ways(rd, [ra])
        finally:
            wire.close()
            await close_all(*clients)
    run(scenario(), 120)


def test_a_member_that_drops_what_it_should_pass_on_is_routed_around(own_broker, tmp_path):
    """alice's broker stops passing her messages; dave joins and meets bob and mallory, who both connect to alice
    too. mallory drops everything it should pass on: bob carries what alice and dave say to each other instead."""
    async def scenario():
        link = await LossyLink(own_broker.tcp_port).start()
        clients = [make_client("alice", tmp_path, link.url), make_client("bob", tmp_path, own_broker.url),
                   make_client("mallory", tmp_path, own_broker.url)]
        rooms = await join_all(clients)
        kept = hostile(rooms[2])
        try:
            for room in rooms:
                await room.wait_for_peers(2, 20)
            link.drop = 1.0
            dave = make_client("dave", tmp_path, own_broker.url)
            clients.append(dave)
            rd = (await join_all([dave]))[0]
            await rd.wait_for_peers(3, 30)
            await chat_both_ways(rd, [rooms[0]])
            assert any(f.get("to") in ("dave", "alice") for f in kept), kept  # mallory was asked, and dropped it
            assert rooms[1].assisted.counts["passed"] >= 1
        finally:
            await close_all(*clients, link)
    run(scenario(), 120)


def test_a_browser_or_unverified_peer_cannot_have_anything_passed_on(broker, tmp_path, monkeypatch):
    """alice and bob in a room. A browser peer that alice verifies, and a peer tagged rtchat.py that never proves
    its key, each send alice signaling frames to pass on to bob or for alice herself: a valid envelope of their
    own. Nothing is passed on or taken: bob's gate never sees it, and alice's gate never sees it either."""
    monkeypatch.setattr(rtchat, "VERIFY_TIMEOUT_S", 1.5)

    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        clients = [make_client(name, tmp_path, broker.url) for name in ("alice", "bob")]
        ra, rb = await join_all(clients, "assist-b")
        try:
            for room in (ra, rb):
                await room.wait_for_peers(1, 20)
            own = rtchat.Identity.generate()
            browser, unproven = Mallory(own), Mallory(own)
            assert await attach(wire, ra.topic, "alice", "mallory", browser, key=own.public_key_string)
            await eventually(lambda: ra.peers.get("mallory") and ra.peers["mallory"].is_verified, 10,
                             "the browser verified")
            assert await attach(wire, ra.topic, "alice", "mallory2", unproven, sign_with=own, tag=rtchat.CLIENT_TAG,
                                compact=True, prove=False)
            before = dict(ra.assisted.counts)
            payloads = []
            for m, name in ((browser, "mallory"), (unproven, "mallory2")):
                for to in ("bob", "*", None):
                    payload = envelope(name, "connect", {"client": rtchat.CLIENT_TAG, "inbox": "0123456789abcdef"},
                                       identity=own, topic=ra.topic, compact=True, raw=True)
                    payloads.append(payload)
                    m.send("chat", json.dumps(signal_frame(payload, to)))
            await eventually(lambda: ra.assisted.counts["refused-peer"] >= 3, 10, "the browser's frames refused")
            await eventually(lambda: "mallory2" not in ra.peers, 10, "the unproven peer dropped")
            assert [ra.assisted.counts[k] - before.get(k, 0) for k in ("passed", "received")] == [0, 0]
            assert not any(room.gate.knows(p) for room in (ra, rb) for p in payloads)
            await close_all(browser, unproven)
        finally:
            wire.close()
            await close_all(*clients)
    run(scenario(), 120)


def test_a_flood_on_the_broker_costs_members_no_more_than_they_take(broker, tmp_path):
    """Made-up names announcing themselves on the broker are answered, and each answer is an envelope for a peer
    with no open session, which goes to members too: never beyond what a member takes from us (it would drop the
    rest, after they filled the channel we chat on)."""
    from test_attacks import feed
    from test_hardening import flood_of_names

    async def scenario():
        clients = [make_client(name, tmp_path, broker.url) for name in ("bob", "carol")]
        rb, rc = await join_all(clients)
        await rb.wait_for_peer("carol", 20)
        await rc.wait_for_peer("bob", 20)
        started = time.monotonic()
        await feed(rb, flood_of_names(2000), 100)
        sent = rb.assisted.counts["sent"]
        budget = rtchat.SIGNAL_FRAME_BUDGET[1] + rtchat.SIGNAL_FRAME_BUDGET[0] * (time.monotonic() - started)
        await chat_both_ways(rb, [rc])
        refused = rc.assisted.counts["refused-rate"]
        await close_all(*clients)
        assert sent <= budget and refused == 0 and rb.assisted.counts["over-budget"] > 0, (sent, budget, refused)
    run(scenario(), 60)
