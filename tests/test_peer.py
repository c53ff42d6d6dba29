"""Peer and the dialects' handshakes: two real aiortc peers paired on 127.0.0.1 by a helper (like aioice's
invite_accept), no broker. A Peer is named after the remote it talks to: alice's session with bob is Peer("bob")."""
from __future__ import annotations

import asyncio
import json

import pytest
from conftest import eventually, run

import rtchat

ALICE, BOB = rtchat.Identity.generate(), rtchat.Identity.generate()
TOPIC = "mrtchat/peer"


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])


async def invite_accept(dialect: rtchat.Dialect = rtchat.RTCHAT_PY, *, signed: bool = True,
                        opened: bool = True) -> tuple[rtchat.Peer, rtchat.Peer]:
    """alice offers to bob, bob answers: (alice's Peer for bob, bob's Peer for alice), both open (unless not
    opened). signed: as if each side's signaling was signed with its message key."""
    ice = rtchat.ice_configuration([])
    to_bob = rtchat.Peer("bob", ice, dialect, client_tag=rtchat.CLIENT_TAG)
    to_alice = rtchat.Peer("alice", ice, dialect, client_tag=rtchat.CLIENT_TAG)
    to_bob.begin()
    offer = await to_bob.create_offer()
    to_alice.begin(mkey=ALICE.message_public if signed else None, stamp=rtchat.now_ms())
    answer = await to_alice.accept_offer(offer)
    await to_bob.accept_answer(answer, mkey=BOB.message_public if signed else None, stamp=rtchat.now_ms())
    if opened:
        await eventually(lambda: to_bob.is_open and to_alice.is_open, 10, "both sides open")
    return to_bob, to_alice


async def close(*peers: rtchat.Peer) -> None:
    for peer in peers:
        peer.close("test over")
        await peer.wait_closed()


def handshake(me: str, identity: rtchat.Identity, **options) -> rtchat.Handshake:
    return rtchat.Handshake(me, TOPIC, identity, options.pop("pins", {}), options.pop("admits", lambda key: True),
                            asyncio.get_running_loop().create_future())


def frames_into(peer: rtchat.Peer, hs: rtchat.Handshake, identity: rtchat.Identity | None = None) -> None:
    """What Sessions does with a peer's frames during set-up: its identity frame to the handshake, questions
    about our key answered."""
    def on_frame(p, label, value):
        if identity is not None and label == "question" and rtchat.answer_identity(p, value, identity):
            return
        if p.dialect.is_handshake(label, value) and not hs.frame.done():
            hs.frame.set_result(value)
    peer.on("frame", on_frame)


def test_a_pair_opens_with_the_channels_of_its_dialect():
    async def scenario():
        for dialect, labels in ((rtchat.RTCHAT_PY, rtchat.TEXT_CHANNELS), (rtchat.BROWSER, rtchat.CHANNELS)):
            opened = []
            to_bob, to_alice = await invite_accept(dialect, opened=False)
            for peer in (to_bob, to_alice):
                peer.on("open", opened.append)
            await eventually(lambda opened=opened: len(opened) == 2, 10, "open events")
            assert set(to_bob.channels) == set(labels) and set(to_alice.channels) == set(labels)
            assert to_bob.is_offerer and not to_alice.is_offerer and to_bob.was_open
            assert to_alice.signal_mkey == ALICE.message_public and to_bob.signal_mkey == BOB.message_public
            ours, theirs = to_bob.dtls_fingerprints()
            assert (theirs, ours) == to_alice.dtls_fingerprints() and ours != theirs
            await close(to_bob, to_alice)
    run(scenario())


def test_the_state_moves_only_forward_by_the_peers_own_methods():
    async def scenario():
        ice = rtchat.ice_configuration([])
        seen = rtchat.Peer("carol", ice, rtchat.RTCHAT_PY)
        assert seen.state == "seen" and seen.pc is None
        seen.verify(BOB.public_key_string, True)            # not open: nothing to verify
        assert seen.state == "seen"
        seen.begin(signer=None, mkey="m", stamp=5)
        assert (seen.state, seen.signal_mkey, seen.signal_ts) == ("connecting", "m", 5)
        seen.begin(mkey="other")                              # once only
        assert seen.signal_mkey == "m"
        closed = []
        seen.on("closed", lambda p, reason: closed.append(reason))
        seen.close("gone")
        seen.close("twice")
        await seen.wait_closed()
        assert seen.state == "closed" and closed == ["gone"]

        to_bob, to_alice = await invite_accept()
        to_bob.verify(BOB.public_key_string, channel_bound=True, author={"key": "k"}, lookalike="b0b")
        assert to_bob.is_verified and to_bob.channel_bound and to_bob.fingerprint == BOB.fingerprint
        assert (to_bob.author, to_bob.lookalike) == ({"key": "k"}, "b0b") and to_bob.verified_at is not None
        await close(to_bob, to_alice)
        assert to_bob.pc.connectionState == "closed" and to_bob.state == "closed"
        assert not [t for t in asyncio.all_tasks() if t.get_name() in ("ping-bob", "ping-alice")]
    run(scenario())


def test_a_name_only_announced_is_freed_as_soon_as_it_is_dropped():
    """A flood of made-up names makes a Peer each: one that only holds references, none to itself, is freed when
    dropped, not at the next full garbage collection (thousands of them raised a listener's peak memory 2-3x)."""
    import gc
    import weakref

    async def scenario():
        peer = rtchat.Peer("zzflood1", rtchat.ice_configuration([]), rtchat.RTCHAT_PY, client_tag=rtchat.CLIENT_TAG)
        peer.on("closed", lambda p, reason: None)
        peer.close("gone")
        gone = weakref.ref(peer)
        del peer
        return gone
    gc.disable()
    try:
        gone = run(scenario())
        assert gone() is None
    finally:
        gc.enable()


def test_frames_that_arrive_after_the_close_are_dropped():
    """aiortc may hand over messages that had arrived before a session closed: none of them reaches the room (it
    would keep them, and the closed session with them, as frames from a peer not verified yet)."""
    async def scenario():
        to_bob, to_alice = await invite_accept()
        frames = []
        to_bob.on("frame", lambda peer, label, value: frames.append(label))
        to_bob.channels["chat"].emit("message", json.dumps({"text": "before"}))
        to_bob.close("gone")
        to_bob.channels["chat"].emit("message", json.dumps({"text": "after"}))
        await close(to_bob, to_alice)
        return frames
    assert run(scenario()) == ["chat"]


def test_only_the_first_answer_is_taken():
    async def scenario():
        ice = rtchat.ice_configuration([])
        to_bob, to_alice = rtchat.Peer("bob", ice, rtchat.RTCHAT_PY), rtchat.Peer("alice", ice, rtchat.RTCHAT_PY)
        answer = await to_alice.accept_offer(await to_bob.create_offer())
        assert to_bob.awaits_answer
        applying = to_bob.accept_answer(answer, signer=BOB.public_key_string)
        assert not to_bob.awaits_answer and to_bob.signed_key == BOB.public_key_string   # at once, before it applies
        assert to_bob.key_string == BOB.public_key_string                                # the key the channel binds
        await applying
        await eventually(lambda: to_bob.is_open and to_alice.is_open, 10, "open")
        await close(to_bob, to_alice)
    run(scenario())


def test_questions_are_answered_by_peer_and_number():
    async def scenario():
        to_bob, to_alice = await invite_accept()
        asked = []

        def on_frame(p, label, value):
            asked.append(value["question"]["topic"])
            if value["question"]["topic"] == "echo":
                p.reply(value["n"], value["question"], f"answer to {value['question']['content']}")
        to_alice.on("frame", on_frame)
        assert await to_bob.ask("echo", "one") == "answer to one"
        assert await to_bob.ask("echo", "two") == "answer to two"
        with pytest.raises(rtchat.AskError, match="no answer from bob within 0.3 s"):
            await to_bob.ask("nobody-answers", timeout=0.3)
        asking = asyncio.ensure_future(to_bob.ask("nobody-answers", timeout=30))
        await eventually(lambda: asked.count("nobody-answers") == 2, 5, "the question asked")
        to_bob.close("gone")
        with pytest.raises(rtchat.AskError, match="bob left"):
            await asking
        await close(to_bob, to_alice)
    run(scenario())


def test_a_probe_is_answered_only_by_a_peer_that_verified_us():
    """A probe waits for the next pong (a future, not a poll): a peer answers pings once it has verified us."""
    async def scenario():
        to_bob, to_alice = await invite_accept()
        assert not await to_bob.probe(timeout=0.5)              # bob has not verified alice: no pong
        to_alice.verify(ALICE.public_key_string, True)
        assert await to_bob.probe(timeout=5) and to_bob.rtt_ms is not None
        to_bob.close("gone")
        assert not await to_bob.probe()
        await close(to_alice)
    run(scenario())


def test_a_silent_rtchat_py_peer_is_dropped_a_silent_browser_is_not(monkeypatch):
    """rtchat.py verifies us within a round trip, so its silence counts from the session's start; a browser
    answers pings only once it has verified us, which may take a while."""
    monkeypatch.setattr(rtchat, "PING_EVERY_S", 0.1)
    monkeypatch.setattr(rtchat, "PEER_SILENT_S", 0.5)

    async def scenario():
        closed = []
        to_bob, to_alice = await invite_accept(rtchat.RTCHAT_PY)
        to_bob.on("closed", lambda p, reason: closed.append(reason))
        await eventually(lambda: closed, 10, "the silent rtchat.py peer dropped")
        assert closed == ["stopped answering pings"]
        await close(to_bob, to_alice)
        browser_bob, browser_alice = await invite_accept(rtchat.BROWSER)
        gone = asyncio.get_running_loop().create_future()
        browser_bob.on("closed", lambda p, reason: gone.done() or gone.set_result(reason))
        browser_alice.verify(ALICE.public_key_string, False)    # bob's page has verified alice: now it answers
        assert await browser_bob.probe(timeout=5) and browser_bob.is_open   # silent so far, and still there
        browser_alice.close("the page closed")
        assert await asyncio.wait_for(gone, 10) in ("stopped answering pings", "chat channel closed",
                                                              "connection closed", "connection failed")
        await close(browser_bob)
    run(scenario())


def test_the_rtchat_py_identity_frame_binds_the_key_to_this_connection():
    async def scenario():
        to_bob, to_alice = await invite_accept()
        at_alice, at_bob = handshake("alice", ALICE), handshake("bob", BOB)
        frames_into(to_bob, at_alice)
        frames_into(to_alice, at_bob)
        proofs = await asyncio.gather(rtchat.RTCHAT_PY.verify(to_bob, at_alice),
                                      rtchat.RTCHAT_PY.verify(to_alice, at_bob))
        assert [p.key for p in proofs] == [BOB.public_key_string, ALICE.public_key_string]
        assert all(p.channel_bound for p in proofs)
        assert proofs[0].author == {"key": BOB.public_key_string, "mkey": BOB.message_public,
                                    "mcert": BOB.message_cert}
        good = json.loads(json.dumps(rtchat.RTCHAT_PY.identity_frame(to_alice, at_bob)))

        def fails(frame: dict) -> rtchat.VerifyFailed:
            with pytest.raises(rtchat.VerifyFailed) as failed:
                rtchat.RTCHAT_PY.check(to_bob, frame, at_alice)
            return failed.value
        # made for another DTLS session (what a man in the middle relaying both sides has): its key, elsewhere
        ours, theirs = to_alice.dtls_fingerprints()
        relayed = rtchat.RTCHAT_PY.identity_frame(to_alice, at_bob)
        relayed["sig"] = __import__("base64").b64encode(BOB.sign(rtchat.signed_bytes(
            "channel-id", TOPIC, "bob", "alice", theirs, ours))).decode()      # the two certificates swapped
        assert (fails(relayed).reason, fails(relayed).fingerprint) == ("mitm", BOB.fingerprint)
        other = rtchat.Identity.generate()
        assert fails({**good, "mcert": other.message_cert}).reason == "bad-identity"    # not its message key
        assert fails({**good, "key": other.public_key_string}).reason == "bad-identity"
        assert fails({**good, "mkey": other.message_public, "mcert": other.message_cert}).reason == "bad-identity"
        assert fails({**good, "sig": "!!"}).reason == "mitm"                      # its credentials, no binding
        assert fails({"t": "id"}).reason == "bad-identity"
        await close(to_bob, to_alice)
    run(scenario())


def test_an_rtchat_py_peer_that_proves_nothing_in_time_fails(monkeypatch):
    monkeypatch.setattr(rtchat, "VERIFY_TIMEOUT_S", 0.3)

    async def scenario():
        to_bob, to_alice = await invite_accept()
        with pytest.raises(rtchat.VerifyFailed) as failed:
            await rtchat.RTCHAT_PY.verify(to_bob, handshake("alice", ALICE))
        assert failed.value.reason == "no-identity"
        at_alice = handshake("alice", ALICE, admits=lambda key: False)   # the policy refuses the key it proves
        frames_into(to_bob, at_alice)
        frames_into(to_alice, handshake("bob", BOB))
        to_alice.send("chat", rtchat.RTCHAT_PY.identity_frame(to_alice, handshake("bob", BOB)))
        with pytest.raises(rtchat.VerifyFailed) as failed:
            await rtchat.RTCHAT_PY.verify(to_bob, at_alice)
        assert failed.value.reason == "key-refused"
        await close(to_bob, to_alice)
    run(scenario())


def test_a_browser_is_checked_with_identify_then_challenge():
    """RTChat's identify (no key pinned for its name) and challenge (one is), answered as browsers answer."""
    async def scenario():
        to_bob, to_alice = await invite_accept(rtchat.BROWSER, signed=False)
        frames_into(to_alice, handshake("bob", BOB), identity=BOB)      # bob answers alice's questions
        proof = await rtchat.BROWSER.verify(to_bob, handshake("alice", ALICE))
        assert proof.key == BOB.public_key_string and not proof.channel_bound
        pins = {BOB.fingerprint: {"key": BOB.public_key_string, "names": ["bob"]}}
        assert (await rtchat.BROWSER.verify(to_bob, handshake("alice", ALICE, pins=pins))).key == BOB.public_key_string
        refused = handshake("alice", ALICE, admits=lambda key: False)
        other = {rtchat.Identity.generate().fingerprint: {"key": ALICE.public_key_string, "names": ["bob"]}}
        for failing in (refused, handshake("alice", ALICE, pins=other)):
            with pytest.raises(rtchat.VerifyFailed) as failed:
                await rtchat.BROWSER.verify(to_bob, failing)
            assert failed.value.reason == "challenge-failed"
        await close(to_bob, to_alice)
    run(scenario())


def test_identify_is_answered_only_for_a_challenge_of_32_bytes_and_within_budget():
    async def scenario():
        to_bob, to_alice = await invite_accept(rtchat.BROWSER, signed=False)
        answers = []
        to_bob.channels["answer"].on("message", answers.append)
        question = {"topic": "identify", "content": "x" * 32}
        assert rtchat.answer_identity(to_alice, {"n": 1, "question": question}, BOB)
        assert rtchat.answer_identity(to_alice, {"n": 2, "question": {"topic": "identify", "content": "short"}}, BOB)
        assert not rtchat.answer_identity(to_alice, {"n": 3, "question": {"topic": "time"}}, BOB)
        await eventually(lambda: answers, 5, "the answer")
        answer = json.loads(answers[0])["answer"]
        assert answer["publicKeyString"] == BOB.public_key_string and len(answers) == 1
        assert rtchat.verify_signature(BOB.public_key_string, answer["signature"].encode("latin-1"), b"x" * 32)
        burst = rtchat.IDENTIFY_BUDGET[1]
        for n in range(burst + 5):
            rtchat.answer_identity(to_alice, {"n": 10 + n, "question": question}, BOB)
        assert to_alice.over_budget["identify"] >= 5
        await close(to_bob, to_alice)
    run(scenario())


def test_dialects_are_chosen_by_client_tag():
    assert rtchat.dialect_for(None) is rtchat.BROWSER and rtchat.dialect_for("chrome") is rtchat.BROWSER
    assert rtchat.dialect_for(rtchat.CLIENT_TAG) is rtchat.RTCHAT_PY
    assert rtchat.dialect_for("rtchat-py/0.3.1") is rtchat.RTCHAT_PY
    assert rtchat.dialect_for("rtchat-py/0.1.0") is None and rtchat.dialect_for("rtchat-py/x") is None
    assert rtchat.RTCHAT_PY.capabilities >= {"files", "acks", "dm"} and "files" not in rtchat.BROWSER.capabilities
    assert rtchat.RTCHAT_PY.compact and not rtchat.BROWSER.compact
