"""Room: real clients, real mosquitto (TCP and websockets), real aiortc peers on 127.0.0.1."""
import asyncio
import base64
import re
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import eventually, make_client, run
from support import Sniffer
from test_attacks import Mallory, Wire, envelope, feed, handled, offer_as, phases
from test_hardening import flood_of_names

import rtchat


async def pair(tmp_path, broker_url, names=("alice", "bob"), room="test"):
    clients = [await make_client(n, tmp_path, broker_url).start() for n in names]
    rooms = [await c.join(room) for c in clients]
    for r in rooms:
        await r.wait_for_peers(len(names) - 1, 20)
    return clients, rooms


async def close_all(clients):
    for c in clients:
        await c.close()


@pytest.mark.parametrize("transport", ["mqtt", "ws"])
def test_two_peers_chat_both_ways(broker, tmp_path, transport):
    async def scenario():
        url = broker.url if transport == "mqtt" else broker.ws_url
        (alice, bob), (ra, rb) = await pair(tmp_path, url)
        got_a, got_b = [], []
        ra.on("message", got_a.append)
        rb.on("message", got_b.append)
        sent = ra.send("hello bob")
        rb.send("hi alice 🎲")
        await eventually(lambda: got_a and got_b, what="both messages")
        assert got_b[0].text == "hello bob" and got_b[0].sender == "alice" and got_b[0].id == sent.id
        assert got_a[0].text == "hi alice 🎲"
        assert got_b[0].trust == "channel-bound" and got_b[0].fingerprint == alice.identity.fingerprint
        peer = rb.peers["alice"]
        assert peer.is_verified and peer.channel_bound and peer.is_rtchat_py
        assert await ra.flush(5)
        await close_all([alice, bob])
    run(scenario())


def test_dm_reaches_only_its_target(broker, tmp_path):
    async def scenario():
        clients, (ra, rb, rc) = await pair(tmp_path, broker.url, ("alice", "bob", "carol"))
        dms_b, dms_c, msgs_c = [], [], []
        rb.on("dm", dms_b.append)
        rc.on("dm", dms_c.append)
        rc.on("message", msgs_c.append)
        ra.dm("bob", "psst")
        await eventually(lambda: dms_b, what="the dm")
        await asyncio.sleep(0.2)
        assert dms_b[0].text == "psst" and dms_b[0].kind == "dm" and not dms_c and not msgs_c
        with pytest.raises(rtchat.UsageError, match="no peer"):
            ra.dm("nobody", "x")
        await close_all(clients)
    run(scenario())


def test_ask_answer_timeout_and_unknown_topic(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        bob.questions["time"] = lambda q: f"noon for {q.sender.name}, {q.content}"

        async def slow(q):
            await asyncio.sleep(5)
        bob.questions["slow"] = slow
        assert await ra.ask("bob", "time", "please") == "noon for alice, please"
        with pytest.raises(rtchat.AskError, match="no answer for 'weather'"):
            await ra.ask("bob", "weather")
        with pytest.raises(rtchat.AskError, match="within 0.5 s"):
            await ra.ask("bob", "slow", timeout=0.5)
        await close_all([alice, bob])
    run(scenario())


def test_three_peers_all_receive_every_message(broker, tmp_path):
    async def scenario():
        clients, rooms = await pair(tmp_path, broker.url, ("alice", "bob", "carol"))
        received = {r.me: [] for r in rooms}
        for r in rooms:
            r.on("message", lambda m, me=r.me: received[me].append((m.sender, m.text)))
        for r in rooms:
            for i in range(5):
                r.send(f"{r.me} {i}")
        await eventually(lambda: all(len(v) == 10 for v in received.values()), what="30 deliveries")
        for me, messages in received.items():
            assert sorted(messages) == sorted((o, f"{o} {i}") for o in received if o != me for i in range(5))
        await close_all(clients)
    run(scenario())


def test_a_join_is_answered_on_the_newcomers_inbox_not_to_the_whole_room(broker, tmp_path):
    """Members answer an rtchat.py newcomer's announcement on its inbox, so that a join costs the broker one
    delivery per member rather than one per member squared (each member announcing itself to all)."""
    async def scenario():
        members = ("bob", "carol", "dave", "erin")
        clients, _ = await pair(tmp_path, broker.url, members, room="joins")
        sniffer = Sniffer(broker.tcp_port)
        aaron = await make_client("aaron", tmp_path, broker.url).start()  # sorts first: everyone waits for its offer
        started = time.monotonic()
        ra = await aaron.join("joins")
        await ra.wait_for_peers(len(members), 20)
        heard = [(topic, rtchat.decode_envelope(payload) or {})
                 for _, topic, payload in sniffer.window("mrtchat/joins", started, time.monotonic())]
        sniffer.stop()
        answers = {e.get("sender") for topic, e in heard
                   if topic == ra.network.inbox and e.get("subtopic") == "connect"}
        broadcasts = [e.get("sender") for topic, e in heard if topic == ra.topic and e.get("sender") != "aaron"]
        print(f"join answered on the inbox by {len(answers)}, announced to the room by {len(broadcasts)} members")
        await close_all([*clients, aaron])
        assert answers == set(members)
    run(scenario())


def test_leave_is_seen_and_history_kept(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        left = []
        rb.on("leave", lambda peer, reason: left.append((peer.name, reason)))
        ra.send("remember me")
        await eventually(lambda: rb.history(5), what="history")
        await alice.close()
        await eventually(lambda: left, what="alice leaving")
        assert left[0][0] == "alice" and "alice" not in rb.peers
        await bob.close()
        again = rtchat.Store(tmp_path / "bob.json")
        again.load()
        assert [e["text"] for e in rtchat.HistoryLog(again.history_path("test")).entries()] == ["remember me"]
    run(scenario())


def attacker(broker):
    """A keyless client on the same topic: it can publish anything under any name."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
    client.connect("127.0.0.1", broker.tcp_port)
    client.loop_start()
    return client


def forge(sender, subtopic, data, sig=None, timestamp=None):
    envelope = {"sender": sender, "timestamp": timestamp or rtchat.now_ms(), "subtopic": subtopic, "data": data}
    if sig:
        envelope.update(nonce=rtchat.new_id(), sig=sig)
    return rtchat.encode_envelope(envelope)


def test_malformed_mqtt_payloads_do_not_disturb_chat(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        evil = attacker(broker)
        junk = [b"", b"\x00" * 7, b"\xff" * 64, b"{" * 5000, b'{"sender":1}', rtchat.lz_compress("not json"),
                rtchat.lz_compress("[" * 10000), forge("mallory", "RTCOffer", {"offer": "x"}),
                forge("mallory", "RTCOffer", {"offer": {"target": "alice", "localDescription": {"sdp": "junk"}}}),
                forge("mallory", "RTCAnswer", {"target": "alice", "localDescription": 5}),
                forge("mallory", "RTCIceCandidate", {"candidate": "candidate:garbage"}),
                forge("mallory", "connect", {"publicKeyString": "{bad"}), forge("bob", "nameChange", [1, 2]),
                forge("bob", "connect", None, sig="!!!"), bytes(range(256)) * 100]
        for payload in junk * 20:
            evil.publish("mrtchat/test", payload)
        got = []
        rb.on("message", got.append)
        await asyncio.sleep(0.5)
        ra.send("still here")
        await eventually(lambda: got, what="chat after the junk")
        assert rb.peers["alice"].is_verified and ra.dropped + rb.dropped > 0
        evil.loop_stop()
        await close_all([alice, bob])
    run(scenario())


def test_forged_unload_and_offer_in_a_peers_name_fail(broker, tmp_path):
    """A keyless attacker forges bob's unload, nameChange and offers: alice keeps bob, shows nothing forged."""
    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        mallory = await make_client("mallory", tmp_path, broker.url).start()
        evil = attacker(broker)
        shown = []
        ra.on("message", shown.append)
        ra.on("dm", shown.append)
        evil.publish("mrtchat/test", forge("bob", "unload", "disconnecting"))
        evil.publish("mrtchat/test", forge("bob", "nameChange", {"oldName": "bob", "newName": "bob"}))
        # An offer "from bob" with mallory's own key (the only key the attacker can sign with) ...
        peer = rtchat.Peer("alice", alice.ice)
        sdp = await peer.create_offer()
        data = {"userInfo": {"publicKeyString": mallory.identity.public_key_string, "client": rtchat.CLIENT_TAG},
                "offer": {"localDescription": {"type": "offer", "sdp": sdp}, "target": "alice"}}
        stamp, nonce = rtchat.now_ms(), rtchat.new_id()
        sig = base64.b64encode(mallory.identity.sign(rtchat.signed_bytes(
            "signaling", "mrtchat/test", "bob", "RTCOffer", stamp, nonce, data))).decode()
        envelope = {"sender": "bob", "timestamp": stamp, "subtopic": "RTCOffer", "data": data,
                    "nonce": nonce, "sig": sig}
        evil.publish("mrtchat/test", rtchat.encode_envelope(envelope))
        # ... and unsigned, with bob's own public key copied from his announcements.
        data["userInfo"]["publicKeyString"] = bob.identity.public_key_string
        evil.publish("mrtchat/test", forge("bob", "RTCOffer", data))
        # ... and a replay of a message bob really sent is dropped as well.
        evil.publish("mrtchat/test", rtchat.encode_envelope(envelope))
        await asyncio.sleep(2.5)
        assert ra.peers["bob"].is_verified and ra.peers["bob"].key_string == bob.identity.public_key_string
        assert not shown
        got = []
        ra.on("message", got.append)
        rb.send("the real bob")
        await eventually(lambda: got, what="bob's real message")
        peer.close()
        evil.loop_stop()
        await close_all([alice, bob, mallory])
    run(scenario())


def test_changed_key_is_refused_loudly(broker, tmp_path):
    """Another 'bob' with a new key: its signaling is not signed by bob's message key, so it gets nowhere,
    and alice is told (once) what to do if bob really has a new key."""
    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        await eventually(lambda: rb.peers["alice"].message_key, what="hellos")
        await bob.close()
        (tmp_path / "elsewhere").mkdir()
        impostor = await make_client("bob", tmp_path / "elsewhere", broker.url).start()
        changed = []
        ra.on("key-changed", lambda name, fp, verdict: changed.append((name, fp, verdict)))
        await impostor.join("test")
        await eventually(lambda: changed, what="the key-changed event")
        assert changed == [("bob", None, "changed")]  # its identity key is not shown on the broker: only in a channel
        await asyncio.sleep(rtchat.FALLBACK_OFFER_PY_S + 1)  # the impostor's own offer comes by now: ignored too
        assert not ra.verified_peers() and len(changed) == 1
        assert set(alice.trust.pins_for("bob")) == {bob.identity.fingerprint}
        await close_all([alice, impostor])
    run(scenario(), 90)


def test_sealed_room_hides_everything_from_the_broker(broker, tmp_path):
    async def scenario():
        seen = []
        spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy")
        spy.on_message = lambda c, u, m: seen.append((m.topic, m.payload))
        spy.connect("127.0.0.1", broker.tcp_port)
        spy.subscribe("#")
        spy.loop_start()
        alice = await make_client("alice", tmp_path, broker.url).start()
        bob = await make_client("bob", tmp_path, broker.url).start()
        outsider = await make_client("eve", tmp_path, broker.url).start()
        ra = await alice.join("secret-room", secret="correct horse battery")
        rb = await bob.join("secret-room", secret="correct horse battery")
        re_ = await outsider.join("secret-room", secret="wrong guess")
        await ra.wait_for_peers(1, 20)
        got = []
        rb.on("message", got.append)
        ra.send("sealed hello")
        await eventually(lambda: got, what="sealed chat")
        await asyncio.sleep(0.3)
        spy.loop_stop()
        assert seen and all(topic.startswith("mrtchat/sealed/") for topic, _ in seen)
        assert not any(b"alice" in p or b"sdp" in p or b"127.0.0.1" in p for _, p in seen)
        assert all(rtchat.decode_envelope(p) is None for _, p in seen)
        assert ra.topic != re_.topic and not re_.peers
        await close_all([alice, bob, outsider])
    run(scenario())


def test_signatures_follow_their_messages(broker, tmp_path, monkeypatch):
    """A message goes out before its signature; one signature per batch of messages follows them (with what
    checks each alone), and the receiver writes them (and acks) once it is there, or after SIGNATURE_WAIT_S
    without one (then it is kept, but never passed on as signed)."""
    monkeypatch.setattr(rtchat, "SIGNATURE_WAIT_S", 0.5)

    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        await eventually(lambda: ra.peers["bob"].late_signatures and rb.peers["alice"].message_key,
                         what="hellos")
        frames = []
        peer = ra.peers["bob"]
        original = peer.send
        peer.send = lambda label, value: (frames.append(value), original(label, value))[1]
        sent = [ra.send(f"signed later {i}") for i in range(3)]
        assert all("sig" not in f for f in frames[:3]) and frames[0]["text"] == "signed later 0"
        assert await ra.flush(5)
        batches = [f for f in frames if isinstance(f, dict) and f.get("t") == "batch"]
        assert [i for f in batches for i in f["ids"]] == [m.id for m in sent]   # one batch here: all three
        assert all(m.sig == batches[0]["sig"] and m.proof["of"] == 3 for m in sent)
        stored = {e["id"]: e for e in rb.ledger.log.entries()}
        for m in sent:
            kept = rtchat.Message.from_dict(stored[m.id])
            assert (kept.sig, kept.proof) == (m.sig, m.proof)
            assert kept.is_signed_by(alice.identity.message_public, ra.topic)
            assert not rtchat.Message.from_dict({**stored[m.id], "text": "other words"}).is_signed_by(
                alice.identity.message_public, ra.topic)
        # a peer that never sends the signature: shown at once, written unsigned later, and acknowledged
        got, acked = [], []
        rb.on("message", got.append)
        on_ack = rtchat.Ledger._FRAMES["ack"]
        monkeypatch.setitem(rtchat.Ledger._FRAMES, "ack", lambda ledger, p, kind, value: (
            acked.extend(value.get("ids", [])), on_ack(ledger, p, kind, value)))
        unsigned = rtchat.Message(id="", room="room", sender="alice", text="never signed", ts=rtchat.now_ms(),
                                  fingerprint=alice.identity.fingerprint, salt=rtchat.new_id())
        unsigned.id = unsigned.bound_id()
        original("chat", {"t": "msg", "id": unsigned.id, "ts": unsigned.ts, "text": unsigned.text,
                          "action": False, "salt": unsigned.salt})
        await eventually(lambda: got, what="the unsigned message shown")
        await eventually(lambda: unsigned.id in {e["id"] for e in rb.ledger.log.entries()},
                         what="written after the wait")
        assert {e["id"]: e for e in rb.ledger.log.entries()}[unsigned.id].get("sig") is None
        await eventually(lambda: unsigned.id in acked, what="the ack")
        # an rtchat.py that takes no batch signature (0.2) gets the message's own signature inline
        peer.late_signatures = False
        frames.clear()
        inline = ra.send("signed now")
        assert frames[0]["sig"] == inline.sig and inline.sig and inline.proof is None
        assert rtchat.verify_message(alice.identity.message_public, inline.sig, inline.signed_part(ra.topic))
        assert await ra.flush(5)
        await close_all([alice, bob])
    run(scenario())


def test_failing_question_handlers_answer_at_once_and_are_reported(broker, tmp_path, monkeypatch, caplog):
    """Whatever a handler raises, or if it takes too long, the asker gets an error answer (in time), the room
    reports a 'question-failed' event, and nothing is logged above debug."""
    monkeypatch.setattr(rtchat, "ANSWER_TIMEOUT_S", 0.5)

    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url)
        failures = []
        rb.on("question-failed", lambda asked, exc: failures.append((asked.topic, asked.sender.name, type(exc))))
        bob.questions["value"] = lambda q: int("not a number")
        bob.questions["type"] = lambda q: len(5)

        async def stuck(q):
            await asyncio.sleep(3600)
        bob.questions["stuck"] = stuck
        for topic, error in (("value", "ValueError"), ("type", "TypeError"), ("stuck", "no answer in time")):
            with pytest.raises(rtchat.AskError, match=f"{topic} failed: {error}"):
                await ra.ask("bob", topic, timeout=5)
        assert [(t, who) for t, who, _ in failures] == [("value", "alice"), ("type", "alice"), ("stuck", "alice")]
        assert failures[0][2] is ValueError and failures[1][2] is TypeError
        assert not [r for r in caplog.records if r.levelno > 10 and r.name == "rtchat"]
        await close_all([alice, bob])
    run(scenario())


# -- who wait_for_room waits for, and trying again where there is no network path (issue 13) ----------------------

def no_path(sdp: str) -> str:
    """The SDP with every candidate moved to port 9 of its address: nothing answers there."""
    return re.sub(r"^(a=candidate:\S+ \d \S+ \d+ \S+) \d+ typ", r"\1 9 typ", sdp, flags=re.MULTILINE)


def answer_with_no_path(wire, topic: str, name: str, answered: list) -> None:
    """An RTChat page called name whose every answer leads nowhere (its network lets nothing through)."""
    def answer(t, payload, env):
        async def go():
            page = Mallory()
            sdp = await page.answer(env["data"]["offer"]["localDescription"]["sdp"])
            await page.close()
            wire.publish(forge(name, "RTCAnswer", {"localDescription": {"type": "answer", "sdp": no_path(sdp)},
                                                   "target": env["sender"]}), topic)
            answered.append(env["sender"])
        asyncio.ensure_future(go())
    wire.on(lambda t, e: e["subtopic"] == "RTCOffer" and e["data"]["offer"].get("target") == name, answer)


def test_wait_for_room_does_not_wait_for_names_only_announced(broker, tmp_path, monkeypatch):
    """A flood of announcements from made-up rtchat.py names: alice offers to some of them (she cannot tell), but
    waits for an answer only so long, and for the rest not at all; bob, who is really there, is all she waits for."""
    monkeypatch.setattr(rtchat, "ANSWER_WAIT_S", 1.0)

    async def scenario():
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url, room="flooded")
        fed, _ = await feed(ra, flood_of_names(600), 100)
        offered = sum(p.state == "connecting" for p in ra.peers.values())
        peers = await ra.wait_for_room(1, timeout=60)
        assert [p.name for p in peers] == ["bob"] and ra.unverified_peers() == []
        assert offered > 0 and len(ra.peers) > 100   # heard of, and some offered to: not waited for
        await close_all([alice, bob])
    run(scenario(), 40)


def test_a_peer_with_no_network_path_is_tried_again_later_each_time(broker, tmp_path, monkeypatch):
    """zed (a page) answers, but no path leads to it: alice says so (no-route), keeps zed listed, and does not
    start again on its next announcements, only when the retry is due; wait_for_room stops waiting for zed."""
    monkeypatch.setattr(rtchat, "NO_PATH_AFTER_S", 0.5)
    monkeypatch.setattr(rtchat, "RETRY_AFTER_S", 2.0)

    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url, room="nopath")
        routes, offering, answered = [], phases(ra, "offering"), []
        ra.on("no-route", lambda peer, facts: routes.append(peer.name))
        answer_with_no_path(wire, "mrtchat/nopath", "zed", answered)
        wire.publish(forge("zed", "connect", {}), "mrtchat/nopath")
        await eventually(lambda: routes == ["zed"], 15, "alice finding no path to zed")
        assert ra.peers["zed"].state == "seen" and [p.name for p in ra.unverified_peers()] == ["zed"]
        assert [p.name for p in await ra.wait_for_room(1, timeout=60)] == ["bob"]     # zed is not waited for
        announced = [forge("zed", "connect", {}, timestamp=rtchat.now_ms() + i) for i in range(3)]
        for payload in announced:
            wire.publish(payload, "mrtchat/nopath")
        await handled(ra, announced)
        assert offering.count("zed") == 1                   # its announcements start nothing while alice waits
        await eventually(lambda: offering.count("zed") == 2, 15, "the next try, when it is due")
        await eventually(lambda: routes == ["zed", "zed"], 15, "no path again")
        assert ra.negotiation.sizes()["failures"] == 1 and ra.peers["zed"].state == "seen"
        wire.publish(forge("zed", "unload", "disconnecting"), "mrtchat/nopath")   # gone: forgotten
        await eventually(lambda: "zed" not in ra.peers, 10, "zed gone")
        assert ra.negotiation.sizes()["failures"] == 0
        wire.close()
        await close_all([alice, bob])
    run(scenario(), 60)


def test_rtchat_py_0_1_is_not_spoken_to(broker, tmp_path):
    """rtchat.py 0.1 (it signed everything with RSA, and lived for a day): its announcements and offers, signed as it
    signed them, start nothing; an rtchat.py 0.2 peer in the same room still connects (issue 13, item 7)."""
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        (alice, bob), (ra, rb) = await pair(tmp_path, broker.url, room="old")
        old, topic = rtchat.Identity.generate(), "mrtchat/old"
        heard, mallory = phases(ra, "heard"), Mallory(old)
        info = {"publicKeyString": old.public_key_string, "client": "rtchat-py/0.1.0"}
        sent = [envelope("zed", "connect", info, identity=old, topic=topic)]
        wire.publish(sent[0], topic)
        sent.append(await offer_as(wire, topic, "alice", "zed", mallory, sign_with=old, tag="rtchat-py/0.1.0"))
        await handled(ra, sent, "zed's announcement and offer")
        assert "zed" not in heard and "zed" not in ra.peers   # no session, not even one being set up
        assert ra.peers["bob"].is_verified and rb.peers["alice"].is_verified
        await mallory.close()
        wire.close()
        await close_all([alice, bob])
    run(scenario(), 40)
