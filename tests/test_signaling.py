"""Signaling: the gate with plain values (payload bytes and a clock in, a signal or the reason it was dropped out; what
is known of keys passed in as KeyFacts), then the MQTT transport against a real mosquitto."""
from __future__ import annotations

import base64

import pytest
from conftest import eventually, run

import rtchat

TOPIC = "mrtchat/gate"
T0, WALL0 = 1000.0, 1_764_100_000_000      # the gate's monotonic seconds and wall-clock milliseconds

ALICE, BOB, MALLORY = rtchat.Identity.generate(), rtchat.Identity.generate(), rtchat.Identity.generate()


def payload(sender: str, subtopic: str, data, *, by: rtchat.Identity | None = None, compact: bool = False,
            stamp: int = WALL0, nonce: str | None = None, topic: str = TOPIC, lz: bool = True) -> bytes:
    """An envelope as rtchat.py sends it: signed with by's RSA key, or with its message key (compact)."""
    env = {"sender": sender, "timestamp": stamp, "subtopic": subtopic, "data": data}
    if by is not None:
        nonce = nonce or rtchat.new_id()
        signed = rtchat.signed_bytes("signaling", topic, sender, subtopic, stamp, nonce, data)
        sig = by.sign_message(signed) if compact else base64.b64encode(by.sign(signed)).decode()
        env.update(nonce=nonce, sig=sig, **({"mk": by.message_public} if compact else {}))
    elif nonce is not None:
        env["nonce"] = nonce
    return rtchat.encode_envelope(env, compact) if lz else rtchat.to_json(env).encode()


def gate(facts: dict[str, rtchat.KeyFacts] | None = None, me: str = "alice", seal=None) -> rtchat.SignalingGate:
    facts = facts or {}
    def facts_of(name: str) -> rtchat.KeyFacts:   # as trust keeps them: by bare name
        return facts.get(name) or facts.get(rtchat.bare_name(name)) or rtchat.KeyFacts()
    return rtchat.SignalingGate(me, seal.topic if seal else TOPIC, facts_of, seal)


def bob_known(**more) -> dict[str, rtchat.KeyFacts]:
    """alice has met bob: his key is pinned (and signs), with the message key he certified."""
    return {"bob": rtchat.KeyFacts(pinned=(BOB.public_key_string,), message_keys={
        BOB.message_public: BOB.public_key_string}, signs=True, **more)}


def test_a_stranger_announcing_itself_passes_with_its_message_key():
    info = {"client": rtchat.CLIENT_TAG, "inbox": "0123456789abcdef"}
    checked = gate().check(payload("bob", "connect", info, by=BOB, compact=True), T0, WALL0)
    signal = checked.signal
    assert signal is not None and checked.reason == ""
    assert (signal.sender, signal.subtopic, signal.data, signal.stamp) == ("bob", "connect", info, WALL0)
    assert signal.mkey == BOB.message_public and signal.signer is None and not signal.impostor


def test_the_same_bytes_again_are_a_replay_and_decoded_once():
    g = gate()
    raw = payload("bob", "connect", {}, by=BOB, compact=True)
    assert g.check(raw, T0, WALL0).signal is not None and g.knows(raw)
    assert g.check(raw, T0 + 1, WALL0 + 1000).reason == "replay"
    assert g.drops == {"replay": 1} and g.dropped == 1


def test_a_copy_from_another_source_is_ignored_and_again_from_it_a_replay():
    """Assisted signaling: the same envelope may come by the broker and through a member (or two). A copy from a
    source other than the last one is ignored unread, not dropped; the same source again is a replay."""
    g = gate()
    raw = payload("bob", "connect", {}, by=BOB, compact=True)
    assert g.check(raw, T0, WALL0).signal is not None
    assert [g.check(raw, T0, WALL0, source).reason for source in ("carol", "dave", "dave", "")] == \
        ["twice", "twice", "replay", "twice"]
    assert g.drops == {"replay": 1}


def test_a_nonce_seen_or_a_time_out_of_the_window_is_stale():
    g = gate()
    assert g.check(payload("bob", "connect", {}, by=BOB, compact=True, nonce="n1"), T0, WALL0).signal is not None
    again = payload("bob", "connect", {"x": 1}, by=BOB, compact=True, nonce="n1")   # other bytes, the same nonce
    assert g.check(again, T0, WALL0).reason == "stale"
    skew = (rtchat.CLOCK_SKEW_S + 1) * 1000
    for stamp in (WALL0 - skew, WALL0 + skew):
        assert g.check(payload("bob", "connect", {}, by=BOB, compact=True, stamp=stamp), T0, WALL0).reason == "stale"
    unsigned = payload("carol", "connect", {}, nonce=None)                    # unsigned: (sender, kind, time)
    assert g.check(unsigned, T0, WALL0).signal is not None
    assert g.check(payload("carol", "connect", {}, lz=False), T0, WALL0).reason == "stale"


def test_our_own_echo_and_offers_to_others_are_ignored_not_dropped():
    g = gate()
    assert g.check(payload("alice", "connect", {}), T0, WALL0).reason == "own"
    offer = {"offer": {"target": "carol", "localDescription": {"type": "offer", "sdp": "v=0"}}}
    assert g.check(payload("bob", "RTCOffer", offer, by=BOB), T0, WALL0).reason == "not-for-us"
    assert g.check(payload("bob", "RTCAnswer", {"target": "carol"}, by=BOB), T0, WALL0).reason == "not-for-us"
    assert g.dropped == 0 and g.checked == 3


def test_each_sender_has_a_rate_that_refills_with_time():
    g = gate()
    per_second, burst = rtchat.RATE_PER_SENDER
    reasons = [g.check(payload("bob", "py:x", None, nonce=f"n{i}"), T0, WALL0).reason for i in range(burst + 1)]
    assert reasons[:burst] == [""] * burst and reasons[burst] == "rate"
    assert g.check(payload("carol", "py:x", None), T0, WALL0).reason == ""    # per sender
    later = T0 + 2 / per_second
    assert g.check(payload("bob", "py:x", None, nonce="again"), later, WALL0).reason == ""


def test_rsa_signatures_are_checked_with_the_key_they_name_or_the_key_known():
    g = gate({"bob": rtchat.KeyFacts(session_key=BOB.public_key_string)})
    connect = {"publicKeyString": BOB.public_key_string}
    assert g.check(payload("bob", "connect", connect, by=BOB), T0, WALL0).signal.signer == BOB.public_key_string
    # a signature by another key than the one it names
    assert g.check(payload("bob", "connect", connect, by=MALLORY), T0, WALL0).reason == "forged"
    # an unload: checked with the key of the live session; another key's signature is forged
    assert g.check(payload("bob", "unload", "x", by=BOB), T0, WALL0).signal.signer == BOB.public_key_string
    assert g.check(payload("bob", "unload", "x", by=MALLORY), T0, WALL0).reason == "forged"
    # from a name we know nothing of: nothing to check it with, so not counted as signed
    assert gate().check(payload("bob", "unload", "x", by=BOB), T0, WALL0).signal.signer is None
    # met before: one of the keys pinned for the name
    pinned = gate({"bob": rtchat.KeyFacts(pinned=(MALLORY.public_key_string, BOB.public_key_string))})
    assert pinned.check(payload("bob", "unload", "x", by=BOB), T0, WALL0).signal.signer == BOB.public_key_string


def test_a_message_key_signs_for_the_identity_that_certified_it_only():
    session = gate({"bob": rtchat.KeyFacts(session_key=BOB.public_key_string, session_mkey=BOB.message_public)})
    assert session.check(payload("bob", "unload", "x", by=BOB, compact=True), T0, WALL0).signal.signer \
        == BOB.public_key_string
    pinned = gate(bob_known())
    signal = pinned.check(payload("bob", "unload", "x", by=BOB, compact=True), T0, WALL0).signal
    assert (signal.signer, signal.mkey) == (BOB.public_key_string, BOB.message_public)
    # another peer's message key does not make a signature bob's
    other = gate({"bob": rtchat.KeyFacts(message_keys={ALICE.message_public: ALICE.public_key_string})})
    signal = other.check(payload("bob", "unload", "x", by=MALLORY, compact=True), T0, WALL0).signal
    assert signal.signer is None and signal.mkey == MALLORY.message_public
    # a bad signature with a message key
    env = {"sender": "bob", "timestamp": WALL0, "subtopic": "unload", "data": "x", "nonce": "n",
           "mk": BOB.message_public, "sig": MALLORY.sign_message(b"other bytes")}
    assert gate().check(rtchat.encode_envelope(env), T0, WALL0).reason == "forged"


def test_signaling_in_a_known_name_with_another_key_is_an_impostor():
    g = gate(bob_known())
    info = {"client": rtchat.CLIENT_TAG, "inbox": "0123456789abcdef"}
    first = g.check(payload("bob", "connect", info, by=MALLORY, compact=True), T0, WALL0)
    assert first.signal is not None and first.signal.impostor           # a connect is only a hint: it passes
    assert (first.impostor, first.warn, first.hint_inbox) == ("bob", True, "0123456789abcdef")
    offer = {"userInfo": info, "offer": {"target": "alice", "localDescription": {"type": "offer", "sdp": "v=0"}}}
    second = g.check(payload("bob", "RTCOffer", offer, by=MALLORY, compact=True), T0 + 1, WALL0)
    assert second.reason == "forged" and not second.warn and second.hint_inbox is None   # said once, hinted seldom
    again = g.check(payload("bob(2)", "connect", info, by=MALLORY, compact=True), T0 + rtchat.REFUSAL_HINT_EVERY_S,
                    WALL0)
    assert again.hint_inbox == "0123456789abcdef" and not again.warn   # one name: bob(2) is bob
    assert g.check(payload("bob", "unload", "x"), T0, WALL0).reason == "forged"            # unsigned
    assert g.check(payload("bob", "connect", {}), T0 + 2, WALL0 + 1).signal.impostor       # unsigned connect
    # our own key's signaling is not an impostor's, and no hint goes to an inbox that is not one
    assert not g.check(payload("bob", "connect", {}, by=BOB, compact=True), T0, WALL0).signal.impostor
    odd = g.check(payload("bob(3)", "connect", {"inbox": "../x"}, by=MALLORY, compact=True), T0 + 99, WALL0)
    assert odd.signal.impostor and odd.hint_inbox is None


def test_after_trust_name_a_new_message_key_goes_to_the_channel():
    g = gate(bob_known(accepting=True))
    signal = g.check(payload("bob", "RTCOffer", {"offer": {"target": "alice"}}, by=MALLORY, compact=True), T0,
                     WALL0).signal
    assert signal is not None and not signal.impostor
    assert g.check(payload("bob", "unload", "x"), T0, WALL0).reason == "forged"   # unsigned still is not bob


def test_under_trust_any_nothing_is_an_impostor():
    g = gate({"bob": rtchat.KeyFacts(pinned=(BOB.public_key_string,), signs=False)})
    assert not g.check(payload("bob", "connect", {}, by=MALLORY, compact=True), T0, WALL0).signal.impostor


def test_a_sealed_room_opens_only_its_own_secret():
    seal = rtchat.Seal("gate", "right")
    g = gate(seal=seal)
    inner = payload("bob", "connect", {}, by=BOB, compact=True, topic=seal.topic)
    assert g.check(seal.seal(inner), T0, WALL0).signal is not None
    assert g.check(rtchat.Seal("gate", "wrong").seal(inner), T0, WALL0).reason == "unreadable"
    assert g.check(inner, T0, WALL0).reason == "unreadable"          # not sealed at all
    assert g.unreadable == 2


def test_lz_string_is_decoded_within_a_budget_that_refills():
    """Browsers' dialect costs ~0.3 ms per KiB to decode: so much a second per room, and what is over it is
    dropped unread (raw JSON and rtchat.py's zlib'd envelopes do not count)."""
    g = gate()
    rate, burst = rtchat.LZ_BUDGET
    rng = __import__("random").Random(7)
    pad = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(25_000))
    payloads = [payload(f"s{i}", "py:x", f"{i:05d}{pad}") for i in range(2 * burst // 25_000)]
    left, expected = burst, []
    for p in payloads:   # the bucket starts full and no time passes
        expected.append("" if left >= len(p) else "malformed")
        left -= len(p) if left >= len(p) else 0
    assert [g.check(p, T0, WALL0).reason for p in payloads] == expected and "malformed" in expected
    later = T0 + len(payloads[0]) / rate
    assert g.check(payload("late", "py:x", "0" + pad), later, WALL0).reason == ""
    assert g.check(payload("raw", "py:x", pad, lz=False), T0, WALL0).reason == ""


def test_the_nonce_cache_forgets_what_is_past_the_clock_window():
    g = gate()
    for i in range(30_000):
        g.check(payload(f"s{i % 500}", "py:x", None, nonce=f"a{i}", lz=False), T0 + i * 0.001, WALL0)
    assert g.sizes()["nonces"] <= 30_000
    late = T0 + 2 * rtchat.CLOCK_SKEW_S + 60
    for i in range(20_001):
        g.check(payload(f"t{i % 500}", "py:x", None, nonce=f"b{i}", lz=False), late + i * 0.001, WALL0)
    assert g.sizes()["nonces"] <= 20_001 + 1 and g.dropped == 0   # the first 30 000 went when the cache was pruned


@pytest.mark.parametrize("junk", [b"", b"\xff" * 9, b"{" * 5000, b'{"sender":1}', rtchat.lz_compress("[]"),
                                  rtchat.to_json({"sender": "a\x1b[2J", "timestamp": 1, "subtopic": "x"}).encode(),
                                  rtchat.to_json({"sender": "a", "timestamp": float("nan"), "subtopic": "x"})
                                  .encode()])
def test_malformed_payloads_are_dropped(junk):
    g = gate()
    assert g.check(junk, T0, WALL0).reason == "malformed" and g.dropped == 1


# -- the MQTT transport, against a real mosquitto ----------------------------------------------------------------

def test_mqtt_publish_subscribe_and_unsubscribe(broker):
    async def scenario():
        a, b = rtchat.Signaling(broker.url), rtchat.Signaling(broker.ws_url)
        await a.connect()
        await b.connect()
        got = []
        b.subscribe("mrtchat/t1", lambda topic, data: got.append((topic, data)))
        b.subscribe("mrtchat/t2", lambda topic, data: got.append((topic, data)))
        await eventually(lambda: (a.publish("mrtchat/t1", b"ping"), got)[1], 10, "the subscription")
        a.publish("mrtchat/t2", b"two")
        await eventually(lambda: ("mrtchat/t2", b"two") in got, 10, "a second topic")
        b.unsubscribe("mrtchat/t1")
        b.subscribe("mrtchat/t3", lambda topic, data: got.append((topic, data)))
        await eventually(lambda: (a.publish("mrtchat/t3", b"three"), ("mrtchat/t3", b"three") in got)[1], 10, "t3")
        a.publish("mrtchat/t1", b"after")    # unsubscribed: t3's arrival above came after the UNSUBSCRIBE
        a.publish("mrtchat/t3", b"marker")
        await eventually(lambda: ("mrtchat/t3", b"marker") in got, 10, "the marker")
        assert ("mrtchat/t1", b"after") not in got and a.published_bytes > 0
        await a.close()
        await b.close()
    run(scenario())


def test_a_handler_that_breaks_does_not_break_the_client(broker, caplog):
    async def scenario():
        a = rtchat.Signaling(broker.url)
        await a.connect()
        got = []

        def broken(topic, data):
            raise ValueError("a bug in a handler")
        a.subscribe("mrtchat/broken", broken)
        a.subscribe("mrtchat/fine", lambda topic, data: got.append(data))
        await eventually(lambda: (a.publish("mrtchat/broken", b"x"), a.publish("mrtchat/fine", b"y"), got)[2], 10,
                         "delivery after a broken handler")
        await a.close()
    run(scenario())
    assert any("broke its handler" in r.getMessage() for r in caplog.records)


def test_an_unreachable_broker_is_one_clear_error():
    async def scenario():
        with pytest.raises(rtchat.BrokerUnreachable, match="cannot reach broker mqtt://127.0.0.1:9"):
            await rtchat.Signaling("mqtt://127.0.0.1:9", connect_timeout=3).connect()
    run(scenario())


def test_the_broker_coming_back_is_announced(own_broker):
    async def scenario():
        a = rtchat.Signaling(own_broker.url)
        await a.connect()
        events = []
        a.on("disconnected", lambda reason: events.append("lost"))
        a.on("connected", lambda: events.append("back"))
        own_broker.stop()
        await eventually(lambda: "lost" in events and not a.is_connected, 15, "the broker lost")
        own_broker.start()
        await eventually(lambda: "back" in events and a.is_connected, 30, "the broker back")
        await a.close()
    run(scenario(), 60)
