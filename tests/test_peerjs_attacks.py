"""Attacks on rtchat.py's PeerJS network (issue 14): an attacker with a client of its own on the same PeerServer
(raw WebSocket messages to anyone) and, where needed, a data connection of its own. Every attack must fail:
nothing is said in another's name, nobody else is disconnected, memory and connections stay bounded.
Real PeerServer, real aiortc, loopback only (see conftest.py).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time

import pytest
import websockets.asyncio.client
from aiortc import RTCConfiguration, RTCPeerConnection
from conftest import eventually, run

import rtchat

ALICE, BOB, MALLORY = (rtchat.PEERJS_ID_PREFIX + n for n in ("alice", "bob", "mallory"))


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])


def member(name: str, server) -> rtchat.PeerJSMesh:
    return rtchat.PeerJSMesh(name, server=server.url(), ice=rtchat.ice_configuration([]))


class Raw:
    """The attacker's own PeerJS client: it sends whatever it likes, to whomever it likes."""

    def __init__(self, server, name: str = "mallory") -> None:
        self.url = rtchat.PeerJSServer.parse(server.url()).socket_url(rtchat.peerjs_id(name), secrets.token_hex(4))

    async def __aenter__(self) -> Raw:
        self.socket = await websockets.asyncio.client.connect(self.url, max_size=None)
        assert json.loads(await self.socket.recv()) == {"type": "OPEN"}
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.socket.close()

    async def send(self, message) -> None:
        await self.socket.send(message if isinstance(message, str) else json.dumps(message))


async def real_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration([]))
    pc.createDataChannel("dc_x")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


async def connected_pair(server, a: str = "alice", b: str = "bob") -> tuple[rtchat.PeerJSMesh, rtchat.PeerJSMesh]:
    alice, bob = await member(a, server).start(), await member(b, server).start()
    await bob.connect(a)
    await eventually(lambda: alice.peers() == [b], what=f"{a} seeing {b}")
    return alice, bob


async def close_all(*meshes) -> None:
    await asyncio.gather(*(m.close() for m in meshes), return_exceptions=True)


def test_chat_in_another_users_name_is_dropped(own_peerserver):
    """mallory is connected to bob and writes lines as alice (the page would show them as alice's)."""
    server = own_peerserver()

    async def scenario():
        alice, bob = await connected_pair(server)
        mallory = await member("mallory", server).start()
        heard = []
        bob.on("chat", heard.append)
        try:
            await mallory.connect("bob")
            connection = next(iter(mallory.connections.values()))
            for sender in ("alice", "bob", "Alice", "alice ", None):
                connection.send({"type": "chat", "chat": {"sender": sender, "message": "give me your password",
                                                          "timestamp": 1}})
            connection.send({"type": "chat", "chat": {"sender": "mallory", "message": "hi", "timestamp": 1}})
            alice.send_chat("the real alice")
            await eventually(lambda: len(heard) == 2, what="bob hearing mallory and alice")
            assert [(c.sender, c.text) for c in heard] in ([("mallory", "hi"), ("alice", "the real alice")],
                                                           [("alice", "the real alice"), ("mallory", "hi")])
            assert bob.dropped == 5
        finally:
            await close_all(alice, bob, mallory)
    run(scenario())


def test_junk_frames_and_floods_on_a_connection(own_peerserver):
    """Not JSON, not an object, bad UTF-8, deep nesting, a flood of lines, a peer list of junk: dropped or capped;
    a JSON object in a binary frame (PeerJS 1.5) is read."""
    server = own_peerserver()

    async def scenario():
        bob = await member("bob", server).start()
        mallory = await member("mallory", server).start()
        heard = []
        bob.on("chat", heard.append)
        try:
            await mallory.connect("bob")
            await eventually(lambda: bob.peers() == ["mallory"], what="bob seeing mallory")
            channel = next(iter(mallory.connections.values())).channel
            for junk in ("not json", "[1, 2]", "null", "[" * 100000 + "]" * 100000, b"\xff\xfe{", "{" * 5000):
                channel.send(junk)
            channel.send(json.dumps({"type": "chat", "chat": {"sender": "mallory", "message": "binary",
                                                              "timestamp": 2}}).encode())
            await eventually(lambda: heard, what="the binary frame")
            assert heard[0].text == "binary"
            [incoming] = bob.connections.values()
            assert incoming.dropped == 6 and incoming.state == "open"
            flood = time.monotonic()
            for n in range(200):
                channel.send(json.dumps({"type": "chat", "chat": {"sender": "mallory", "message": f"{n}"}}))
            channel.send(json.dumps({"type": "connections", "peerIds": ["junk", ALICE + "\x1b", 7] +
                                     [rtchat.PEERJS_ID_PREFIX + f"ghost{n}" for n in range(5000)]}))
            await eventually(lambda: len(heard) - 1 + bob.dropped == 200 and len(bob.connections) > 1,
                             what="every line heard or dropped, and bob dialling the listed ghosts")
            rate, burst = rtchat.CHAT_RATE
            assert len(heard) - 1 <= burst + rate * (time.monotonic() - flood)
            ghosts = [peer for peer, _ in bob.connections if peer.startswith(rtchat.PEERJS_ID_PREFIX + "ghost")]
            assert 0 < len(ghosts) <= rtchat.MAX_PENDING_SESSIONS
            assert all(rtchat.peerjs_name(peer) for peer, _ in bob.connections)
        finally:
            await close_all(bob, mallory)
    run(scenario(), 90)


def test_forged_signaling_through_the_server(own_peerserver):
    """mallory's own client sends bob malformed and hijacking messages: bob stays connected to alice and to the
    server, answers no junk, and creates at most MAX_PEERJS_CONNECTIONS connections for mallory."""
    server = own_peerserver()

    async def scenario():
        alice, bob = await connected_pair(server)
        [(_, live_id)] = alice.connections
        try:
            async with Raw(server) as raw:
                before = bob.signaling.dropped
                junk = ["not json", "[]", {"type": "OFFER", "dst": BOB}, {"type": "OFFER", "dst": BOB, "payload": 5},
                        {"type": "OFFER", "dst": BOB, "payload": {"connectionId": "../x", "type": "data",
                                                                   "sdp": {"type": "offer", "sdp": "v=0"}}},
                        {"type": "CANDIDATE", "dst": BOB, "payload": {"connectionId": live_id,
                                                                       "candidate": {"candidate": "x" * 600}}},
                        {"type": "OFFER", "dst": BOB, "payload": {"connectionId": "dc_big", "type": "data",
                                                                   "sdp": {"type": "offer", "sdp": "x" * 2 ** 21}}}]
                for message in junk:
                    await raw.send(message)
                # aimed at the live alice-bob connection: the server stamps src=mallory, so none of it fits
                await raw.send({"type": "ANSWER", "dst": ALICE, "payload": {
                    "connectionId": live_id, "sdp": {"type": "answer", "sdp": "v=0\r\n"}}})
                await raw.send({"type": "CANDIDATE", "dst": BOB, "payload": {"connectionId": live_id, "candidate": {
                    "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}}})
                await raw.send({"type": "LEAVE", "dst": BOB})
                await raw.send({"type": "EXPIRE", "dst": ALICE})
                await raw.send({"type": "OFFER", "dst": BOB, "payload": {    # an SDP with no data channel
                    "connectionId": "dc_x", "type": "data", "sdp": {"type": "offer", "sdp": "v=0\r\n"}}})
                sdp = await real_offer()
                for n in range(30):   # good offers, more than one peer may have connections
                    await raw.send({"type": "OFFER", "dst": BOB, "payload": {
                        "connectionId": f"dc_{n}", "type": "data", "serialization": "json",
                        "sdp": {"type": "offer", "sdp": sdp}, "metadata": {"peerIds": [ALICE]}}})
                await raw.send({"type": "OFFER", "dst": BOB})   # one more dropped: bob has read everything
                await eventually(lambda: bob.signaling.dropped - before == 7, what="bob reading it all")
                assert len([k for k in bob.connections if k[0] == MALLORY]) == rtchat.MAX_PEERJS_CONNECTIONS
                await eventually(lambda: len([e for e in server.events if e.get("type") == "ANSWER" and
                                              e["src"] == BOB]) == rtchat.MAX_PEERJS_CONNECTIONS, what="answers")
                assert bob.signaling.is_connected and alice.signaling.is_connected and server.proc.poll() is None
                assert alice.peers() == ["bob"] and bob.peers() == ["alice"]
                alice.send_chat("still fine")
                heard = []
                bob.on("chat", heard.append)
                await eventually(lambda: heard, what="bob hearing alice")
        finally:
            await close_all(alice, bob)
    run(scenario())


def test_a_bad_answer_fails_the_dial_cleanly(own_peerserver, caplog):
    """bob dials mallory, who answers with an SDP aiortc cannot take: one clear error, nothing logged as a failure,
    and a second (good-looking) answer to the same connection is not read."""
    server = own_peerserver()

    async def scenario():
        bob = await member("bob", server).start()
        try:
            async with Raw(server) as raw:
                dial = asyncio.ensure_future(bob.connect("mallory"))
                offer = json.loads(await asyncio.wait_for(raw.socket.recv(), 10))
                assert offer["type"] == "OFFER" and offer["payload"]["metadata"] == {"peerIds": []}
                bad = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=setup:nonsense\r\n"
                for sdp in (bad, await real_offer()):
                    await raw.send({"type": "ANSWER", "dst": BOB, "payload": {
                        "connectionId": offer["payload"]["connectionId"], "sdp": {"type": "answer", "sdp": sdp}}})
                with pytest.raises(rtchat.PeerUnavailable) as error:
                    await dial
                assert str(error.value) == "could not connect to mallory (bad answer)"
                assert bob.connections == {} and bob.signaling.is_connected
        finally:
            await bob.close()
    run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- between rtchat.py peers: identity frames and signed lines (the interactive chat's PeerJSPlace) ---------------

async def chat_place(server, tmp_path, name: str = "alice") -> tuple[rtchat.Client, rtchat.PeerJSPlace]:
    """An rtchat.py chat's place on the mesh, as `rtchat.py NAME --peerjs URL` at a terminal has it."""
    client = rtchat.Client(name, state=tmp_path / f"{name}.json", ice=[], ice_hosts=["127.0.0.1"])
    await client.start(broker=False)
    return client, await client.join_peerjs(server.url())


def keyed(name: str, server, identity: rtchat.Identity | None = None, cls=rtchat.PeerJSMesh) -> rtchat.PeerJSMesh:
    return cls(name, server=server.url(), ice=rtchat.ice_configuration([]),
               identity=identity or rtchat.Identity.generate())


def signed_line(identity: rtchat.Identity, sender: str, text: str, signer: rtchat.Identity | None = None) -> dict:
    msg = rtchat.Message(id="", room=rtchat.PEERJS_ROOM, sender=sender, text=text, ts=rtchat.now_ms(),
                         fingerprint=identity.fingerprint, salt=rtchat.new_id())
    msg.id = msg.bound_id()
    msg.sig = (signer or identity).sign_message(msg.signed_part(rtchat.PEERJS_TOPIC))
    return msg.frame()


def test_forged_lines_from_a_verified_rtchat_peer_are_refused(own_peerserver, tmp_path):
    """mallory proves her own key to alice, then sends lines whose words do not fit their id, signed by another
    key, unsigned, or in the page's format (which an rtchat.py peer does not use): none is shown or kept; her
    genuine line is, verified, and so is the page's format from a page user."""
    server = own_peerserver()

    async def scenario():
        client, alice = await chat_place(server, tmp_path)
        me = rtchat.Identity.generate()
        mallory = await keyed("mallory", server, me).start()
        heard, failures = [], []
        alice.on("message", heard.append)
        alice.on("verify-failed", lambda *a: failures.append(a))
        try:
            await mallory.connect("alice")
            await eventually(lambda: alice.peers.get("mallory") and alice.peers["mallory"].is_verified,
                             what="alice verifying mallory")
            connection = mallory.connection_to("alice")
            assert connection.proof is not None  # and mallory verified alice
            altered = signed_line(me, "mallory", "I owe you nothing")
            altered["text"] = "I owe you 100 euros"
            unsigned = signed_line(me, "mallory", "unsigned")
            del unsigned["sig"]
            for frame in (altered, signed_line(me, "mallory", "other key", rtchat.Identity.generate()), unsigned,
                          {**signed_line(me, "mallory", "bad salt"), "salt": "x"},
                          {"type": "chat", "chat": {"sender": "mallory", "message": "unsigned page line",
                                                    "timestamp": 1}},
                          {"t": "id", "key": me.public_key_string}):   # a second identity frame: ignored
                connection.send(frame)
            connection.send(signed_line(me, "mallory", "the genuine line"))
            await eventually(lambda: heard, what="the genuine line")
            assert [(m.sender, m.text, m.trust) for m in heard] == [("mallory", "the genuine line", "channel-bound")]
            assert heard[0].fingerprint == me.fingerprint and alice.mesh.dropped == 5
            connection.send(signed_line(me, "mallory", "the genuine line") | {"id": heard[0].id, "salt": heard[0].salt,
                                                                               "ts": heard[0].ts})
            connection.send(heard[0].frame())  # the same line again (a replay): taken once
            connection.send(signed_line(me, "mallory", "the last line"))
            await eventually(lambda: len(heard) == 2, what="the last line")
            assert [m.text for m in heard] == ["the genuine line", "the last line"] and alice.mesh.dropped == 6
            await eventually(lambda: [e["text"] for e in alice.journal.log.entries()] == [m.text for m in heard],
                             what="both kept")
            assert not failures
            pins = client.trust.pins_for("mallory")
            assert list(pins) == [me.fingerprint]
        finally:
            await close_all(mallory)
            await client.close()
    run(scenario(), 60)


class Forger(rtchat.PeerJSMesh):
    """Says it proves its key, then sends an identity frame made for another connection (as a man in the middle,
    or a replay, would have): the right key and certificate, a signature over other DTLS fingerprints."""

    async def _verify(self, connection) -> None:
        frame = rtchat.RTCHAT_PY.identity_frame(connection, rtchat.Handshake(
            self.name, rtchat.PEERJS_TOPIC, self.identity, {}, lambda key: True, connection.identity_frame))
        ours, theirs = connection.dtls_fingerprints()
        other = rtchat.signed_bytes("channel-id", rtchat.PEERJS_TOPIC, self.name, connection.name, theirs, ours)
        frame["sig"] = base64.b64encode(self.identity.sign(other)).decode()
        connection.send(frame)


def test_an_identity_frame_for_another_connection_is_refused(own_peerserver, tmp_path):
    server = own_peerserver()

    async def scenario():
        client, alice = await chat_place(server, tmp_path)
        forger = await keyed("mallory", server, cls=Forger).start()
        detected, joined = [], []
        alice.on("mitm-detected", lambda member, fp: detected.append((member.name, fp)))
        alice.on("join", joined.append)
        try:
            with pytest.raises(rtchat.RtchatError):  # alice closes the connection before it counts as open
                await forger.connect("alice", 15)
            assert detected == [("mallory", forger.identity.fingerprint)]
            assert not joined and "mallory" not in alice.peers and client.trust.pins_for("mallory") == {}
        finally:
            await close_all(forger)
            await client.close()
    run(scenario(), 60)


def test_a_changed_key_under_a_pinned_name_is_refused(own_peerserver, tmp_path):
    """alice met the real omar before (his key is pinned): someone else logging in as omar with another key is
    refused on the connection, said once, never shown as omar."""
    server = own_peerserver()

    async def scenario():
        client, alice = await chat_place(server, tmp_path)
        client.trust.pin("omar", rtchat.Identity.generate().public_key_string, signs=True)
        impostor = await keyed("omar", server).start()
        changed, joined = [], []
        alice.on("key-changed", lambda *a: changed.append(a))
        alice.on("join", joined.append)
        try:
            with contextlib.suppress(rtchat.RtchatError):  # it may see alice's proof before she closes
                await impostor.connect("alice", 15)
            await eventually(lambda: changed and not impostor.peers(), what="alice refusing the impostor")
            assert [(name, verdict) for name, _, verdict in changed] == [("omar", "changed")]
            assert changed[0][1] == impostor.identity.fingerprint and not joined
            assert alice.refused["omar"] == impostor.identity.public_key_string
        finally:
            await close_all(impostor)
            await client.close()
    run(scenario(), 60)


def test_a_pinned_name_that_proves_no_key_is_shown_as_such(own_peerserver, tmp_path):
    """Someone logs in as omar (whose key alice pinned) and says nothing of rtchat.py's (as the page, or a server
    that strips `"rtchat": 1`): alice takes omar's lines as unverified, and the join says a key is pinned."""
    server = own_peerserver()

    async def scenario():
        client, alice = await chat_place(server, tmp_path)
        client.trust.pin("omar", rtchat.Identity.generate().public_key_string, signs=True)
        impostor = await member("omar", server).start()   # no key: the page's way
        joined, heard = [], []
        alice.on("join", joined.append)
        alice.on("message", heard.append)
        try:
            await impostor.connect("alice")
            await eventually(lambda: joined, what="the impostor joining")
            assert not joined[0].is_verified and joined[0].pinned and alice.label(joined[0]) == "omar?"
            record = rtchat.event_record(alice, "join", joined[0])
            assert record["text"].startswith("joined, UNVERIFIED") and "pinned" in record["text"]
            impostor.send_chat("it is me, omar")
            await eventually(lambda: heard, what="the line")
            assert (heard[0].sender, heard[0].trust, heard[0].fingerprint) == ("omar", "unverified", None)
        finally:
            await close_all(impostor)
            await client.close()
    run(scenario(), 60)
