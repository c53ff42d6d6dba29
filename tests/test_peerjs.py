"""The PeerJS network (issue 14): a peerjs-multichat mesh member made of rtchat.py's parts.

Plain values first (URLs, ids, server messages, the merge rules, chat frames), then real parts: a real PeerServer
(npm `peer`, see the `peerserver` fixture in conftest.py) and real aiortc connections on loopback. The real page
is in test_peerjs_browser.py, attacks in test_peerjs_attacks.py.
"""
from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time

import pytest
from conftest import ROOT, eventually, run

import rtchat
from rtchat import MeshAction, MeshPlan, PeerJSChat, PeerJSServer, PeerJSSignal

ME, BOB, CAROL, DAVE = (rtchat.PEERJS_ID_PREFIX + n for n in ("me", "bob", "carol", "dave"))


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])


def member(name: str, server, **options) -> rtchat.PeerJSMesh:
    return rtchat.PeerJSMesh(name, server=server if isinstance(server, str) else server.url(),
                             ice=rtchat.ice_configuration([]), **options)


class Heard:
    """What a mesh member saw: chat lines, joins, leaves, unreachable names, in order."""

    def __init__(self, mesh: rtchat.PeerJSMesh) -> None:
        self.chats: list[PeerJSChat] = []
        self.events: list[tuple] = []
        mesh.on("chat", self.chats.append)
        for event in ("join", "leave", "unreachable", "lost", "back"):
            mesh.on(event, lambda *args, event=event: self.events.append((event, *args)))

    def saw(self, *event) -> bool:
        return any(e[:len(event)] == event for e in self.events)


async def close_all(*meshes: rtchat.PeerJSMesh) -> None:
    await asyncio.gather(*(mesh.close() for mesh in meshes), return_exceptions=True)


# =============================================================================
# plain values
# =============================================================================

def test_the_default_server_is_the_pages_cloud():
    server = PeerJSServer.parse(None)
    assert (server.secure, server.host, server.port, server.path, server.key) == (True, "0.peerjs.com", 443, "/",
                                                                                  "peerjs")
    assert server.socket_url(rtchat.peerjs_id("alice"), "t0k") == \
        "wss://0.peerjs.com:443/peerjs?key=peerjs&id=secure-p2p-multichat-alice&token=t0k"


@pytest.mark.parametrize("url, expected", [
    ("ws://127.0.0.1:9000/", (False, "127.0.0.1", 9000, "/", "peerjs")),
    ("ws://127.0.0.1:9000/myapp?key=abc", (False, "127.0.0.1", 9000, "/myapp/", "abc")),
    ("wss://example.org/a/b/", (True, "example.org", 443, "/a/b/", "peerjs")),
    ("https://example.org:8443", (True, "example.org", 8443, "/", "peerjs")),
    ("http://example.org", (False, "example.org", 80, "/", "peerjs")),
    ("127.0.0.1:9000", (False, "127.0.0.1", 9000, "/", "peerjs")),
    ("0.peerjs.com", (True, "0.peerjs.com", 443, "/", "peerjs")),
    ("[::1]:9000/p?key=k%20x", (False, "::1", 9000, "/p/", "k x")),
])
def test_server_urls(url, expected):
    server = PeerJSServer.parse(url)
    assert (server.secure, server.host, server.port, server.path, server.key) == expected


def test_socket_url_quotes_what_it_carries():
    server = PeerJSServer.parse("[::1]:9000/p?key=k%20x")
    assert server.socket_url(rtchat.peerjs_id("bob smith"), "abc") == \
        "ws://[::1]:9000/p/peerjs?key=k%20x&id=secure-p2p-multichat-bob%20smith&token=abc"
    assert str(server) == "ws://[::1]:9000/p/"


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "ws://:9000/", "ws://h:99999/", "ws://h/?key=",
                                 "ws://h/?token=1", "ws://h/?key=a&key=b", "ws://h/?key=%1b[31m"])
def test_bad_server_urls_are_usage_errors(url):
    with pytest.raises(rtchat.UsageError) as error:
        PeerJSServer.parse(url)
    assert error.value.exit_code == rtchat.EX_USAGE


def test_names_and_ids():
    assert rtchat.peerjs_id("alice") == "secure-p2p-multichat-alice"
    assert rtchat.peerjs_id("bob smith-2_x") == "secure-p2p-multichat-bob smith-2_x"
    for bad in ("", " alice", "alice ", "a  b", "al.ice", "\u00e9", "a" * 65, "a\x1b"):
        with pytest.raises(rtchat.UsageError):
            rtchat.peerjs_id(bad)
    assert rtchat.peerjs_name("secure-p2p-multichat-bob") == "bob"
    for junk in (None, 3, "bob", "other-app-bob", "secure-p2p-multichat-", "secure-p2p-multichat-b\u202eob"):
        assert rtchat.peerjs_name(junk) is None
    ids = [BOB, "junk", BOB, 7, CAROL, "secure-p2p-multichat-x\ny"]
    assert rtchat.peerjs_ids(ids) == (BOB, CAROL)
    assert rtchat.peerjs_ids({"a": BOB}) == ()
    many = [rtchat.PEERJS_ID_PREFIX + f"u{n}" for n in range(1000)]
    assert len(rtchat.peerjs_ids(many)) == rtchat.MAX_PEERJS_IDS


SDP = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"


def offer(**changes) -> dict:
    payload = {"sdp": {"type": "offer", "sdp": SDP}, "type": "data", "connectionId": "dc_abc123",
               "browser": "chrome", "label": "dc_abc123", "reliable": False, "serialization": "json",
               "metadata": {"peerIds": [CAROL, "junk"]}}
    payload.update(changes)
    return {"type": "OFFER", "src": BOB, "dst": ME, "payload": payload}


def test_server_messages_are_read_into_checked_values():
    assert PeerJSSignal.parse(offer()) == PeerJSSignal("OFFER", BOB, "dc_abc123", SDP, peer_ids=(CAROL,),
                                                       client="chrome")
    answer = {"type": "ANSWER", "src": BOB, "payload": {"sdp": {"type": "answer", "sdp": SDP},
                                                        "connectionId": "dc_1", "browser": "rtchat-py/0.2.0"}}
    assert PeerJSSignal.parse(answer) == PeerJSSignal("ANSWER", BOB, "dc_1", SDP, client="rtchat-py/0.2.0")
    candidate = {"type": "CANDIDATE", "src": BOB, "payload": {"connectionId": "dc_1", "candidate": {
        "candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0,
        "usernameFragment": "Z7Io"}}}
    assert PeerJSSignal.parse(candidate).candidate == candidate["payload"]["candidate"]
    assert PeerJSSignal.parse({"type": "EXPIRE", "src": BOB, "dst": ME}) == PeerJSSignal("EXPIRE", BOB)
    assert PeerJSSignal.parse({"type": "LEAVE", "src": BOB}) == PeerJSSignal("LEAVE", BOB)


def test_an_offer_without_metadata_lists_nobody():
    """The page throws on such an OFFER; we take it, with an empty peer list."""
    for metadata in (None, "x", {"peerIds": "x"}, {}):
        assert PeerJSSignal.parse(offer(metadata=metadata)).peer_ids == ()


@pytest.mark.parametrize("message", [
    None, [], "OFFER", {"type": "OPEN"}, {"type": "HEARTBEAT", "src": BOB},
    {"type": "OFFER", "src": "other-app", "payload": offer()["payload"]},
    {"type": "LEAVE", "src": 42}, {"type": "EXPIRE"},
    {**offer(), "src": "secure-p2p-multichat-\x1b[2J"},
    offer(connectionId="dc_../../x"), offer(connectionId="x" * 65), offer(connectionId=None),
    offer(serialization="binary"), offer(type="media"), offer(sdp="v=0"), offer(sdp={"type": "answer", "sdp": "v"}),
    offer(sdp={"type": "offer", "sdp": ""}), offer(sdp={"type": "offer", "sdp": ["v=0"]}),
    offer(sdp={"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}),
    {"type": "OFFER", "src": BOB, "payload": "x"},
    {"type": "CANDIDATE", "src": BOB, "payload": {"connectionId": "dc_1", "candidate": {"candidate": "c" * 513}}},
    {"type": "CANDIDATE", "src": BOB, "payload": {"connectionId": "dc_1", "candidate": {"candidate": ""}}},
    {"type": "CANDIDATE", "src": BOB, "payload": {"connectionId": "dc_1", "candidate": "candidate:1"}},
])
def test_malformed_server_messages_are_dropped(message):
    assert PeerJSSignal.parse(message) is None


def test_candidate_fields_of_the_wrong_type_are_left_out():
    value = {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": 0, "sdpMLineIndex": True,
             "usernameFragment": "u" * 300}
    candidate = PeerJSSignal.parse({"type": "CANDIDATE", "src": BOB,
                                    "payload": {"connectionId": "dc_1", "candidate": value}}).candidate
    assert candidate == {"candidate": value["candidate"], "sdpMid": None, "sdpMLineIndex": None,
                         "usernameFragment": None}


def test_rate_limit():
    limit = rtchat.RateLimit(2.0, 3, max_keys=2)
    assert [limit.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("a", now=0.4) is False and limit.allow("a", now=0.6) is True
    assert limit.allow("b", now=0.0) and limit.allow("c", now=0.0)   # past max_keys the buckets start over


def test_max_message_size_from_sdp():
    assert rtchat.max_message_bytes("a=max-message-size:262144\r\n") == 262144
    assert rtchat.max_message_bytes("a=max-message-size:16300\r\n") == 16300
    assert rtchat.max_message_bytes("a=mid:0\r\n") == 65536                       # RFC 8841's default
    assert rtchat.max_message_bytes("a=max-message-size:0\r\n") == rtchat.MAX_FRAME_CHARS   # 0: no limit
    assert rtchat.max_message_bytes("a=max-message-size:99999999\r\n") == rtchat.MAX_FRAME_CHARS


# -- the merge rules, as plain values ------------------------------------------------------------------------

def plan(**options) -> MeshPlan:
    numbers = itertools.count(1)
    return MeshPlan(ME, lambda: f"c{next(numbers)}", **options)


def kinds(actions: list[MeshAction]) -> list[tuple]:
    return [(a.kind, a.peer_id) for a in actions]


def test_a_callee_dials_the_callers_peers_and_sends_its_own():
    p = plan()
    assert p.opened(DAVE, "x") == []                                  # unknown connections are ignored
    actions = p.offered(BOB, "b1", (CAROL, ME, BOB))
    assert actions == [MeshAction("answer", BOB, "b1"), MeshAction("dial", CAROL, "c1", ())]
    assert p.opened(CAROL, "c1") == [MeshAction("join", CAROL)]      # we called carol: she sends her list
    assert p.opened(BOB, "b1") == [MeshAction("join", BOB), MeshAction("send-peers", BOB, "b1", (CAROL,))]
    assert p.peers() == [CAROL, BOB]
    assert p.opened(BOB, "b1") == []                                  # once


def test_a_peer_list_dials_whom_we_lack_and_skips_us():
    p = plan()
    [dial] = p.want(BOB)
    assert dial == MeshAction("dial", BOB, "c1", ())
    assert p.want(BOB) == []                                          # being dialled already
    p.opened(BOB, "c1")
    assert p.listed(DAVE, (CAROL,)) == []                             # not from a connected peer
    assert kinds(p.listed(BOB, (ME, BOB, CAROL, CAROL))) == [("dial", CAROL)]
    assert p.listed(BOB, (CAROL,)) == []                              # carol is being dialled
    assert p.want(CAROL) == []


def test_the_peer_list_we_send_with_an_offer():
    p = plan()
    p.want(BOB)
    p.opened(BOB, "c1")
    assert p.want(CAROL) == [MeshAction("dial", CAROL, "c2", (BOB,))]


def test_duplicate_connections_are_read_and_the_oldest_open_one_sends():
    p = plan()
    p.want(BOB)                                                       # c1, ours
    assert kinds(p.offered(BOB, "b1", ())) == [("answer", BOB)]       # bob dialled us at the same time
    assert p.sending_connection(BOB) is None
    assert kinds(p.opened(BOB, "b1")) == [("join", BOB), ("send-peers", BOB)]
    assert p.opened(BOB, "c1") == []                                  # a second connection: no second join
    assert p.sending_connection(BOB) == "b1"
    assert p.closed(BOB, "b1", "gone") == []                          # bob is still there, on c1
    assert p.sending_connection(BOB) == "c1"
    assert p.closed(BOB, "c1", "ice") == [MeshAction("leave", BOB, "c1", reason="ice")]
    assert p.peers() == [] and p.sending_connection(BOB) is None


def test_expire_drops_what_is_being_set_up_once():
    p = plan()
    p.want(BOB)
    assert p.expired(BOB) == [MeshAction("drop", BOB, "c1"), MeshAction("unreachable", BOB, reason="not online")]
    assert p.closed(BOB, "c1", "dropped") == []                       # no second word about it
    assert p.expired(BOB) == []
    assert kinds(p.want(BOB)) == [("dial", BOB)]                      # and it can be tried again


def test_expire_leaves_open_connections_alone():
    p = plan()
    p.want(BOB)
    p.opened(BOB, "c1")
    assert p.expired(BOB) == []                                       # bob left the server, not us
    assert p.peers() == [BOB]


def test_a_connection_that_never_opens_makes_the_peer_unreachable():
    p = plan()
    p.want(BOB)
    assert p.closed(BOB, "c1", "did not connect") == [MeshAction("unreachable", BOB, "c1", reason="did not connect")]


def test_offers_over_the_caps_are_not_answered():
    p = plan(max_peers=3, max_pending=2)
    assert p.offered(ME, "m1", ()) == []                              # from ourselves
    assert kinds(p.offered(BOB, "b1", ())) == [("answer", BOB)]
    assert p.offered(BOB, "b1", ()) == []                             # the same connection again
    assert kinds(p.offered(CAROL, "k1", ())) == [("answer", CAROL)]
    assert p.offered(DAVE, "d1", ()) == []                            # two being set up already
    p.opened(BOB, "b1")
    p.opened(CAROL, "k1")
    for n in range(2, rtchat.MAX_PEERJS_CONNECTIONS + 1):
        assert kinds(p.offered(BOB, f"b{n}", ())) == [("answer", BOB)]
        p.opened(BOB, f"b{n}")
    assert p.offered(BOB, "b9", ()) == []                             # connections per peer
    assert kinds(p.offered(DAVE, "d1", ())) == [("answer", DAVE)]
    eve = rtchat.PEERJS_ID_PREFIX + "eve"
    assert p.offered(eve, "e1", ()) == []                             # peers


def test_dials_over_the_pending_cap_wait_their_turn():
    p = plan(max_pending=2)
    ids = tuple(rtchat.PEERJS_ID_PREFIX + f"u{n}" for n in range(5))
    p.want(BOB)
    p.opened(BOB, "c1")
    assert [a.peer_id for a in p.listed(BOB, ids)] == list(ids[:2])
    assert not p.is_settled()
    assert [a.peer_id for a in p.opened(ids[0], "c2")] == [ids[0], ids[2]]   # its join, then the next dial
    assert [a.peer_id for a in p.closed(ids[1], "c3", "failed")] == [ids[1], ids[3]]
    assert [a.peer_id for a in p.expired(ids[2])][-1] == ids[4]


def test_the_peer_count_cap_holds_for_lists():
    p = plan(max_peers=3)
    p.want(BOB)
    p.opened(BOB, "c1")
    ids = tuple(rtchat.PEERJS_ID_PREFIX + f"u{n}" for n in range(10))
    assert len(p.listed(BOB, ids)) == 2


def test_settled_once_every_peer_has_given_its_list():
    p = plan()
    assert p.is_settled()
    p.want(BOB)
    assert not p.is_settled()                                         # being set up
    p.opened(BOB, "c1")
    assert not p.is_settled()                                         # bob has not told us whom he has
    p.listed(BOB, ())
    assert p.is_settled()
    p.offered(CAROL, "k1", (BOB,))                                    # carol's list came with her offer
    p.opened(CAROL, "k1")
    assert p.is_settled()


# -- chat frames ---------------------------------------------------------------------------------------------

def test_a_chat_line_is_read_exactly_and_only_in_its_connections_name():
    text = "hi \x1b[31mred\x1b[0m \u202eevil\n  "
    frame = {"type": "chat", "chat": {"sender": "bob", "message": text, "timestamp": 1700000000123}}
    assert PeerJSChat.read(frame, BOB) == PeerJSChat("bob", text, 1700000000123)
    assert PeerJSChat("bob", text, 1700000000123).frame() == frame
    assert PeerJSChat.read(frame, CAROL) is None                      # carol writing as bob
    for chat in ({"sender": "bob", "message": ""}, {"sender": "bob", "message": 5},
                 {"sender": "bob", "message": "x" * (rtchat.MAX_TEXT_CHARS + 1)}, {"message": "hi"},
                 {"sender": ["bob"], "message": "hi"}):
        assert PeerJSChat.read({"type": "chat", "chat": chat}, BOB) is None
    assert PeerJSChat.read({"type": "chat", "chat": "hi"}, BOB) is None
    assert PeerJSChat.read({"type": "connections", "chat": frame["chat"]}, BOB) is None
    for stamp in (True, float("nan"), float("inf"), -1, 2 ** 60, "1700000000123", None):
        chat = {"sender": "bob", "message": "hi", "timestamp": stamp}
        assert PeerJSChat.read({"type": "chat", "chat": chat}, BOB).timestamp is None
    assert PeerJSChat.read({"type": "chat", "chat": {"sender": "bob", "message": "hi", "timestamp": 1.5e12}},
                           BOB).timestamp == 1500000000000


# =============================================================================
# a real PeerServer
# =============================================================================

def test_log_in_as_the_pages_id(peerserver):
    async def scenario():
        alice = await member("alice", peerserver).start()
        try:
            assert alice.signaling.is_connected and alice.peer_id == "secure-p2p-multichat-alice"
            await eventually(lambda: any(e == {"event": "connection", "id": alice.peer_id}
                                         for e in peerserver.events), what="the server's connection")
        finally:
            await alice.close()
        await eventually(lambda: {"event": "disconnect", "id": alice.peer_id} in peerserver.events,
                         what="the server letting go")
    run(scenario())


def test_a_taken_name(peerserver):
    async def scenario():
        alice = await member("taken", peerserver).start()
        try:
            with pytest.raises(rtchat.NameTaken) as error:
                await member("taken", peerserver).start()
            assert error.value.exit_code == rtchat.EX_CANTCREAT == 73
            assert str(error.value) == f"taken is already taken on ws://127.0.0.1:{peerserver.port}/"
            assert alice.signaling.is_connected                         # the one logged in stays
        finally:
            await alice.close()
    run(scenario())


def test_a_wrong_key_and_a_right_one_on_a_path(own_peerserver):
    server = own_peerserver(key="s3cret", path="/chat")

    async def scenario():
        with pytest.raises(rtchat.PeerServerRefused) as error:
            await member("alice", f"ws://127.0.0.1:{server.port}/chat/").start()
        assert error.value.exit_code == rtchat.EX_PROTOCOL == 76
        assert "Invalid key provided" in str(error.value)
        with pytest.raises(rtchat.PeerServerUnreachable) as error:
            await member("alice", f"ws://127.0.0.1:{server.port}/?key=s3cret").start()  # no server at /peerjs
        assert "rejected WebSocket connection" in str(error.value)
        alice = await member("alice", server.url(key="s3cret")).start()
        await alice.close()
    run(scenario())


def test_an_unreachable_server(tmp_path):
    async def scenario():
        with pytest.raises(rtchat.PeerServerUnreachable) as error:
            await member("alice", "ws://127.0.0.1:9/").start()
        assert error.value.exit_code == rtchat.EX_UNAVAILABLE == 69
        assert str(error.value).startswith("cannot reach PeerJS server ws://127.0.0.1:9/: ")
        assert isinstance(error.value, rtchat.BrokerUnreachable)
    run(scenario())


def test_an_unknown_user_is_not_online(own_peerserver):
    server = own_peerserver(expire_timeout=1000)

    async def scenario():
        alice = await member("alice", server).start()
        heard = Heard(alice)
        try:
            with pytest.raises(rtchat.PeerUnavailable) as error:
                await alice.connect("bob")
            assert str(error.value) == "bob is not online" and error.value.exit_code == rtchat.EX_NOUSER == 67
            assert heard.events == [("unreachable", "bob", "not online")]
            assert alice.connections == {} and alice.plan.is_settled()
        finally:
            await alice.close()
    run(scenario())


def test_heartbeats_keep_us_on_the_server(own_peerserver):
    """A server that drops clients silent for 1.5 s: the silent one goes, the one sending heartbeats stays."""
    server = own_peerserver(alive_timeout=1500)

    async def scenario():
        alive = await member("alive", server, heartbeat_s=0.3).start()
        silent = await member("silent", server, heartbeat_s=3600).start()
        lost = asyncio.get_running_loop().create_future()
        silent.on("lost", lambda reason: lost.done() or lost.set_result(reason))
        alive.on("lost", lambda reason: pytest.fail("the one with heartbeats was dropped"))
        try:
            await asyncio.wait_for(lost, 20)
            assert alive.signaling.is_connected and not silent.signaling.is_connected
            beats = [e for e in server.events if e.get("type") == "HEARTBEAT" and e["src"] == alive.peer_id]
            assert beats and not any(e.get("type") == "HEARTBEAT" and e["src"] == silent.peer_id
                                     for e in server.events)
        finally:
            await close_all(alive, silent)
    run(scenario())


def test_two_members_chat_both_ways(peerserver):
    async def scenario():
        alice, bob = await member("alice2", peerserver).start(), await member("bob2", peerserver).start()
        heard_a, heard_b = Heard(alice), Heard(bob)
        try:
            await bob.connect("alice2")
            assert bob.peers() == ["alice2"]
            await eventually(lambda: alice.peers() == ["bob2"], what="alice seeing bob")
            assert heard_a.events == [("join", "bob2")] and heard_b.events == [("join", "alice2")]
            [connection] = bob.connections.values()
            assert connection.channel.label == connection.connection_id and connection.channel.ordered is False
            assert connection.max_message_bytes == 262144
            [sent] = [e for e in peerserver.events if e.get("type") == "OFFER" and e["src"] == bob.peer_id]
            payload = sent["payload"]
            assert payload["metadata"] == {"peerIds": []} and payload["serialization"] == "json"
            assert payload["label"] == payload["connectionId"] and payload["type"] == "data"
            text = "caf\u00e9 \U0001F30D \x1b[2J exact  "
            chat, names = alice.send_chat(text)
            assert names == ["bob2"]
            await eventually(lambda: heard_b.chats, what="bob hearing alice")
            assert heard_b.chats == [chat] and chat.text == text and chat.sender == "alice2"
            _, names = bob.send_chat("and back")
            assert names == ["alice2"]
            await eventually(lambda: heard_a.chats, what="alice hearing bob")
            assert heard_a.chats[0].text == "and back"
            assert await alice.wait_settled(5) and await bob.wait_settled(5)
            with pytest.raises(rtchat.UsageError):
                alice.send_chat("")
            with pytest.raises(rtchat.UsageError):
                await alice.connect("alice2")
        finally:
            await close_all(alice, bob)
    run(scenario())


def test_members_with_keys_prove_them_and_sign_their_lines_and_one_without_gets_the_pages_format(peerserver):
    """Two members with an identity (as the chat has) say `"rtchat": 1`, prove their keys on the connection and
    send each other signed lines; a third without one (as a pipe, or the page) is neither asked nor sent any."""
    async def scenario():
        keys = rtchat.Identity.generate(), rtchat.Identity.generate()
        ann = await member("ann", peerserver, identity=keys[0]).start()
        ben = await member("ben", peerserver, identity=keys[1]).start()
        cal = await member("cal", peerserver).start()
        heard_ann, heard_cal = Heard(ann), Heard(cal)
        try:
            await ben.connect("ann")
            await cal.connect("ann")
            await eventually(lambda: sorted(ann.peers()) == ["ben", "cal"], what="ann seeing both")
            assert await ben.wait_settled(10) and await cal.wait_settled(10)
            said = {(e["type"], rtchat.peerjs_name(e["src"]), rtchat.peerjs_name(e["dst"])): e["payload"].get("rtchat")
                    for e in peerserver.events if e.get("type") in ("OFFER", "ANSWER")
                    and {e["src"], e["dst"]} <= {ann.peer_id, ben.peer_id, cal.peer_id}}
            assert said[("OFFER", "ben", "ann")] == said[("ANSWER", "ann", "ben")] == 1
            assert said[("OFFER", "cal", "ann")] is None and said[("ANSWER", "ann", "cal")] == 1
            assert ann.connection_to("ben").proof.key == keys[1].public_key_string
            assert ben.connection_to("ann").proof.channel_bound and ann.connection_to("cal").proof is None
            chat, names = ben.send_chat("signed", action=True)
            assert sorted(names) == ["ann", "cal"] and chat.sig and chat.msg_id
            await eventually(lambda: heard_ann.chats and heard_cal.chats, what="both hearing ben")
            got = heard_ann.chats[0]
            assert (got.text, got.action, got.msg_id, got.sig, got.proof.key) == \
                ("signed", True, chat.msg_id, chat.sig, keys[1].public_key_string)
            assert (heard_cal.chats[0].text, heard_cal.chats[0].proof) == ("* ben signed", None)  # the page's way
        finally:
            await close_all(ann, ben, cal)
    run(scenario())


def test_three_members_merge_into_one_mesh(peerserver):
    """alice and bob are connected; carol knows only bob. She ends up connected to alice too."""
    async def scenario():
        alice, bob, carol = [await member(n, peerserver).start() for n in ("alice3", "bob3", "carol3")]
        heard = {m.name: Heard(m) for m in (alice, bob, carol)}
        try:
            await alice.connect("bob3")
            assert await alice.wait_settled(10)
            await carol.connect("bob3")
            assert await carol.wait_settled(10)
            assert sorted(carol.peers()) == ["alice3", "bob3"]
            await eventually(lambda: sorted(alice.peers()) == ["bob3", "carol3"] and
                             sorted(bob.peers()) == ["alice3", "carol3"], what="a full mesh")
            chat, names = carol.send_chat("hello both")
            assert sorted(names) == ["alice3", "bob3"]
            await eventually(lambda: heard["alice3"].chats and heard["bob3"].chats, what="both hearing carol")
            assert heard["alice3"].chats == heard["bob3"].chats == [chat]
            alice.send_chat("from alice")
            await eventually(lambda: len(heard["carol3"].chats) == 1 and len(heard["bob3"].chats) == 2,
                             what="alice heard")
        finally:
            await close_all(alice, bob, carol)
    run(scenario())


def test_dialling_each_other_at_once_makes_duplicates_that_work(peerserver):
    async def scenario():
        alice, bob = await member("alice4", peerserver).start(), await member("bob4", peerserver).start()
        heard_a, heard_b = Heard(alice), Heard(bob)
        try:
            await asyncio.gather(alice.connect("bob4"), bob.connect("alice4"))
            await eventually(lambda: all(c.state == "open" for m in (alice, bob) for c in m.connections.values())
                             and len(alice.connections) == len(bob.connections) == 2, what="two connections")
            assert heard_a.events == [("join", "bob4")] and heard_b.events == [("join", "alice4")]
            oldest = alice.plan.sending_connection(bob.peer_id)
            alice.send_chat("once")
            await eventually(lambda: heard_b.chats, what="bob hearing alice")
            alice.connections[(bob.peer_id, oldest)].close("test")       # the other one takes over
            await eventually(lambda: len(bob.connections) == 1, what="bob seeing it closed")
            assert alice.plan.sending_connection(bob.peer_id) != oldest and alice.peers() == ["bob4"]
            alice.send_chat("twice")
            await eventually(lambda: len(heard_b.chats) == 2, what="the second line")
            assert [c.text for c in heard_b.chats] == ["once", "twice"]
            assert not any(e[0] == "leave" for e in heard_a.events + heard_b.events)
        finally:
            await close_all(alice, bob)
    run(scenario())


def test_leaving_is_seen_at_once(peerserver):
    async def scenario():
        alice, bob = await member("alice5", peerserver).start(), await member("bob5", peerserver).start()
        heard = Heard(alice)
        try:
            await bob.connect("alice5")
            await eventually(lambda: alice.peers() == ["bob5"], what="alice seeing bob")
            await bob.close()
            await eventually(lambda: heard.saw("leave", "bob5"), timeout=5, what="alice seeing bob leave")
            assert alice.peers() == [] and alice.connections == {}
        finally:
            await close_all(alice, bob)
    run(scenario())


KILLED_MEMBER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import rtchat
async def main():
    rtchat.restrict_ice_hosts(["127.0.0.1"])
    mesh = await rtchat.PeerJSMesh("bob6", server=sys.argv[2], ice=rtchat.ice_configuration([])).start()
    await mesh.connect("alice6")
    print("connected", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_a_killed_member_is_seen_leaving_within_seconds(peerserver):
    """SIGKILL says nothing to anyone: ICE consent, checked every second on PeerJS connections, notices
    (aioice's own pace would take about 33 s)."""
    async def scenario():
        alice = await member("alice6", peerserver).start()
        heard = Heard(alice)
        bob = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_MEMBER, str(ROOT), peerserver.url(),
                                                   stdout=subprocess.PIPE)
        try:
            assert await asyncio.wait_for(bob.stdout.readline(), 30) == b"connected\n"
            await eventually(lambda: alice.peers() == ["bob6"], what="alice seeing bob")
            killed = time.monotonic()
            bob.kill()
            await eventually(lambda: heard.saw("leave", "bob6"), timeout=20, what="alice seeing bob gone")
            print(f"killed member seen leaving after {time.monotonic() - killed:.1f} s")
        finally:
            if bob.returncode is None:
                bob.kill()
            await bob.wait()
            await alice.close()
    run(scenario())


def test_chat_goes_on_when_the_server_goes(own_peerserver):
    server = own_peerserver()

    async def scenario():
        alice, bob = await member("alice", server).start(), await member("bob", server).start()
        heard_a, heard_b = Heard(alice), Heard(bob)
        try:
            await bob.connect("alice")
            await eventually(lambda: alice.peers() == ["bob"], what="alice seeing bob")
            server.stop()
            await eventually(lambda: heard_a.saw("lost") and heard_b.saw("lost"), what="both losing the server")
            alice.send_chat("still here")
            await eventually(lambda: heard_b.chats, what="bob hearing alice")
            with pytest.raises(rtchat.PeerUnavailable):
                await alice.connect("carol", timeout=1)
        finally:
            await close_all(alice, bob)
    run(scenario())


def test_a_member_logs_in_again_when_the_server_comes_back(own_peerserver):
    """The server restarts (same port, nothing remembered): alice is let in again under her id, and carol, new,
    reaches her through it and merges with bob."""
    server = own_peerserver()

    async def scenario():
        alice, bob = await member("alice", server).start(), await member("bob", server).start()
        heard_a, heard_b = Heard(alice), Heard(bob)
        carol = None
        try:
            await bob.connect("alice")
            await eventually(lambda: alice.peers() == ["bob"], what="alice seeing bob")
            server.stop()
            await eventually(lambda: heard_a.saw("lost"), what="alice losing the server")
            own_peerserver(port=server.port)
            await eventually(lambda: heard_a.saw("back") and heard_b.saw("back"), 20, "both let in again")
            carol = await member("carol", server).start()
            await carol.connect("alice")
            assert await carol.wait_settled(20)
            assert sorted(carol.peers()) == ["alice", "bob"]
            carol.send_chat("made it")
            await eventually(lambda: heard_a.chats and heard_b.chats, what="both hearing carol")
        finally:
            await close_all(alice, bob, *([carol] if carol else []))
    run(scenario(), 90)


def test_rtchat_imports_without_websockets_and_says_what_is_missing():
    code = ("import sys; sys.modules['websockets'] = None\n"
            "import asyncio, rtchat\n"
            "try:\n"
            "    asyncio.run(rtchat.PeerJSMesh('alice', server='ws://127.0.0.1:9/', ice=None).start())\n"
            "except rtchat.RtchatError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "missing Python packages: websockets" in result.stdout and "-m pip install websockets" in result.stdout
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-c", "import sys, rtchat; print('websockets' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False"
