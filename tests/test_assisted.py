"""Assisted signaling (issue 15, item 4): offers, answers and announcements between two members travel through a
member both are connected to, so a room keeps forming links while the broker is down or loses messages.

Real mosquitto, real aiortc peers, loopback only. A LossyLink (tests/support.py) stands between a client and the
broker where the broker is to lose that client's messages. Attacks on the frame are in test_attacks.py.
"""
from __future__ import annotations

import asyncio

from conftest import eventually, make_client, run
from support import LossyLink

import rtchat


async def join_all(clients: list[rtchat.Client], room: str = "test") -> list[rtchat.Room]:
    for client in clients:
        await client.start()
    return [await client.join(room) for client in clients]


async def close_all(*things) -> None:
    for thing in things:
        await thing.close()


def heard(room: rtchat.Room) -> list[str]:
    said: list[str] = []
    room.on("message", lambda msg: said.append(msg.text))
    return said


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


def test_newcomer_meets_everyone_through_a_member_after_the_broker_dies(own_broker, tmp_path):
    """alice, bob and carol in a room; alice's and bob's broker stops passing their messages (dave's announcement
    reaches carol only); dave joins, connects to carol, and the broker is killed. dave ends up verified with alice
    and bob over direct links whose offers and answers carol passed on, and they chat both ways."""
    async def scenario():
        links = {name: await LossyLink(own_broker.tcp_port).start() for name in ("alice", "bob")}
        clients = [make_client("alice", tmp_path, links["alice"].url), make_client("bob", tmp_path, links["bob"].url),
                   make_client("carol", tmp_path, own_broker.url)]
        rooms = await join_all(clients)
        try:
            for room in rooms:
                await room.wait_for_peers(2, 20)
            for link in links.values():
                link.drop = 1.0
            dave = make_client("dave", tmp_path, own_broker.url)
            clients.append(dave)
            rd = (await join_all([dave]))[0]
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
        finally:
            await close_all(*clients, *links.values())
    run(scenario(), 120)


def test_no_relay_member_passes_nothing_on(own_broker, tmp_path):
    """The same room with carol refusing to pass anything on (--no-relay): dave meets carol only, and carol counts
    what she refused."""
    async def scenario():
        links = {name: await LossyLink(own_broker.tcp_port).start() for name in ("alice", "bob")}
        clients = [make_client("alice", tmp_path, links["alice"].url), make_client("bob", tmp_path, links["bob"].url),
                   make_client("carol", tmp_path, own_broker.url, relay=False)]
        rooms = await join_all(clients)
        try:
            for room in rooms:
                await room.wait_for_peers(2, 20)
            for link in links.values():
                link.drop = 1.0
            dave = make_client("dave", tmp_path, own_broker.url)
            clients.append(dave)
            rd = (await join_all([dave]))[0]
            await rd.wait_for_peer("carol", 20)
            rc = rooms[2]
            await eventually(lambda: rc.assisted.counts["refused-no-relay"] >= 1, 10, "carol refusing to pass on")
            assert rc.assisted.counts["passed"] == 0
            assert not any(r.peers.get("dave") for r in rooms[:2])
            assert [p.name for p in rd.verified_peers()] == ["carol"]
        finally:
            await close_all(*clients, *links.values())
    run(scenario(), 120)


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
