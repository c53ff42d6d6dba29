"""Attacks on rtchat.py: a keyless attacker on the broker (paho publishing any envelope under any name) and,
where needed, an aiortc peer of the attacker's own. Every attack must fail: nothing forged is shown, nothing is
forcibly disconnected, memory stays bounded. Real mosquitto, real aiortc, loopback only (see conftest.py).

`pytest -s tests/test_attacks.py` prints one summary line with the counts at the end.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from conftest import eventually, make_client, run

import rtchat

# -- bookkeeping: every attack is recorded, the module prints one summary line at the end ----------------------

OUTCOMES: list[tuple[str, bool, str]] = []      # (attack, blocked, detail)
COUNTS = {"payloads": 0, "frames": 0}


def record(attack: str, blocked: bool, detail: str = "") -> bool:
    OUTCOMES.append((attack, bool(blocked), detail))
    return bool(blocked)


def assert_blocked(prefix: str) -> None:
    """Fail the test with every sub-attack of this test that got through (not just the first)."""
    failed = [f"{a}: {d}" for a, b, d in OUTCOMES if a.startswith(prefix) and not b]
    assert not failed, "attacks that succeeded:\n  " + "\n  ".join(failed)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    blocked = sum(b for _, b, _ in OUTCOMES)
    print(f"\n[rtchat attacks] attacks tried={len(OUTCOMES)} blocked={blocked} "
          f"succeeded={len(OUTCOMES) - blocked} payloads fuzzed={COUNTS['payloads']} "
          f"frames fuzzed={COUNTS['frames']}")
    for attack, ok, detail in OUTCOMES:
        if not ok:
            print(f"[rtchat attacks]   SUCCEEDED: {attack} {detail}")


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])   # the attacker's own aiortc peers too


# -- the attacker's tools ----------------------------------------------------------------------------------------

def envelope(sender, subtopic, data, *, identity=None, topic=None, stamp=None, nonce=None, raw=False,
             compact=False) -> bytes:
    """An envelope under any name: unsigned, or signed with a key the attacker holds (its own); compact: signed
    with that identity's message key, as rtchat.py 0.2 signs (zlib'd unless raw)."""
    stamp = rtchat.now_ms() if stamp is None else stamp
    env = {"sender": sender, "timestamp": stamp, "subtopic": subtopic, "data": data}
    if identity is not None:
        nonce = nonce or rtchat.new_id()
        signed = rtchat.signed_bytes("signaling", topic, sender, subtopic, stamp, nonce, data)
        if compact:
            env.update(nonce=nonce, mk=identity.message_public, sig=identity.sign_message(signed))
        else:
            env.update(nonce=nonce, sig=base64.b64encode(identity.sign(signed)).decode())
    elif nonce is not None:
        env["nonce"] = nonce
    return rtchat.to_json(env).encode() if raw else rtchat.encode_envelope(env, compact)


class Wire:
    """The keyless attacker on the broker: sees every message of every room, publishes anything."""

    def __init__(self, broker, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.seen: list[tuple[str, bytes, dict | None]] = []
        self.hooks: list = []
        self.published = 0
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mallory-{rtchat.new_id()}")
        client.on_message = lambda c, u, m: self._hop(m.topic, m.payload)
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("127.0.0.1", broker.tcp_port)
        client.subscribe("mrtchat/#")
        client.loop_start()
        subscribed.wait(5)
        self.client = client

    def _hop(self, topic: str, payload: bytes) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, topic, payload)
        except RuntimeError:
            pass

    def _deliver(self, topic: str, payload: bytes) -> None:
        env = rtchat.decode_envelope(payload)
        self.seen.append((topic, payload, env))
        for hook in list(self.hooks):
            hook(topic, payload, env)

    def publish(self, payload: bytes, topic: str) -> None:
        self.published += 1
        self.client.publish(topic, payload)

    def captured(self, topic: str, sender: str, subtopic: str, target: str | None = None) -> list[tuple]:
        """(payload, envelope, topic it was on) of what the sender published in that room."""
        return [(p, e, t) for t, p, e in self.seen if _in(t, topic) and e and e["sender"] == sender
                and e["subtopic"] == subtopic and (target is None or _target(e) == target)]

    def expect(self, predicate) -> asyncio.Future:
        future = self.loop.create_future()

        def hook(topic, payload, env):
            if env is not None and not future.done():
                try:
                    hit = predicate(topic, env)
                except Exception:
                    hit = False
                if hit:
                    future.set_result((topic, payload, env))
                    self.hooks.remove(hook)
        self.hooks.append(hook)
        return future

    def on(self, predicate, action) -> None:
        """Run action(topic, payload, env) for every matching message (the attacker reacting in real time)."""
        def hook(topic, payload, env):
            if env is not None and predicate(topic, env):
                action(topic, payload, env)
        self.hooks.append(hook)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _in(t: str, topic: str) -> bool:
    """The room topic, or a peer's inbox under it (rtchat.py sends offers/answers to the other's inbox)."""
    return t == topic or t.startswith(topic + "/")


def _target(env: dict):
    data = env.get("data")
    if not isinstance(data, dict):
        return None
    if env["subtopic"] == "RTCOffer":
        offer = data.get("offer")
        return offer.get("target") if isinstance(offer, dict) else None
    return data.get("target")


def _sdp(env: dict) -> str:
    data = env["data"]
    return (data["offer"] if env["subtopic"] == "RTCOffer" else data)["localDescription"]["sdp"]


class Mallory:
    """The attacker's own WebRTC peer: raw frames on RTChat's channels, answers identify as told."""

    def __init__(self, identity: rtchat.Identity | None = None, auto_pong: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.identity = identity
        self.channels: dict = {}
        self.inbox: list[tuple[str, str]] = []
        self.questions: list[dict] = []
        self.auto_pong = auto_pong
        self.answer_with = "valid"     # valid | garbage | wrong-n | other-challenge | none
        self.pc.on("datachannel", self._adopt)

    def _adopt(self, channel) -> None:
        self.channels[channel.label] = channel
        channel.on("message", lambda data, label=channel.label: self._on_message(label, data))

    def _on_message(self, label: str, data) -> None:
        self.inbox.append((label, data if isinstance(data, str) else repr(data)))
        if label == "ping" and self.auto_pong:
            self.send("pong", '"pong"')
        if label != "question":
            return
        try:
            value = json.loads(data)
            question = value["question"]
        except (ValueError, KeyError, TypeError):
            return
        self.questions.append(value)
        if question.get("topic") in ("identify", "challenge") and self.identity is not None:
            self._answer_identity(value, question)

    def _answer_identity(self, value: dict, question: dict) -> None:
        if self.answer_with == "none":
            return
        challenge = question["content"].encode("latin-1")
        if self.answer_with == "other-challenge":
            challenge = os.urandom(32)
        signature = self.identity.sign(challenge).decode("latin-1")
        if self.answer_with == "garbage":
            signature = "x" * 256
        answer = signature if question["topic"] == "challenge" else {
            "publicKeyString": self.identity.public_key_string, "signature": signature}
        n = value["n"] + 1 if self.answer_with == "wrong-n" else value["n"]
        self.send("answer", json.dumps({"n": n, "answer": answer, "question": question}))

    async def offer(self) -> str:
        for label in rtchat.CHANNELS:
            self._adopt(self.pc.createDataChannel(label))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, offer_sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))

    def identity_frame(self, topic: str, name: str, victim: str, key: str | None = None,
                       fingerprints: tuple[str, str] | None = None) -> str:
        """rtchat.py's identity frame: our identity key over the room, both names and both DTLS certificates as we
        see them (or other fingerprints: a frame made for another connection)."""
        ours, theirs = fingerprints or (rtchat.sdp_fingerprint(self.pc.localDescription.sdp),
                                        rtchat.sdp_fingerprint(self.pc.remoteDescription.sdp))
        binding = rtchat.signed_bytes("channel-id", topic, name, victim, ours, theirs)
        return json.dumps({"t": "id", "key": key or self.identity.public_key_string,
                           "mkey": self.identity.message_public, "mcert": self.identity.message_cert,
                           "sig": base64.b64encode(self.identity.sign(binding)).decode()})

    def is_open(self, labels=("chat", "dm", "question", "answer")) -> bool:
        return all(label in self.channels and self.channels[label].readyState == "open" for label in labels)

    def send(self, label: str, text) -> bool:
        channel = self.channels.get(label)
        if channel is None or channel.readyState != "open":
            return False
        try:
            channel.send(text)
        except ValueError:   # over the size the victim advertised: see unlimit()
            return False
        return True

    def unlimit(self) -> None:
        """A hostile sender ignores the victim's a=max-message-size."""
        self.pc.sctp._remote_max_message_size = 0

    async def close(self) -> None:
        await self.pc.close()


async def offer_as(wire: Wire, topic: str, target: str, name: str, mallory: Mallory, *, key: str | None = None,
                   sign_with: rtchat.Identity | None = None, tag: str | None = None, compact: bool = False) -> bytes:
    """The attacker's offer to `target` in `name`'s name, published on the room topic; returns the payload."""
    sdp = await mallory.offer()
    info = {"publicKeyString": key or mallory.identity.public_key_string, **({"client": tag} if tag else {})}
    if compact:
        info = {"client": tag or rtchat.CLIENT_TAG, "inbox": f"{random.getrandbits(64):016x}"}
    data = {"userInfo": info, "offer": {"localDescription": {"type": "offer", "sdp": sdp}, "target": target}}
    payload = envelope(name, "RTCOffer", data, identity=sign_with, topic=topic, compact=compact)
    wire.publish(payload, topic)
    return payload


async def attach(wire: Wire, topic: str, target: str, name: str, mallory: Mallory, *, key: str | None = None,
                 sign_with: rtchat.Identity | None = None, tag: str | None = None, compact: bool = False,
                 prove: bool = True, timeout: float = 8) -> bool:
    """The attacker offers to `target` as `name`: unsigned (a "browser") or signed with its own key (RSA, or its
    message key if compact). Signed and tagged as rtchat.py, it then proves its key in the channel as rtchat.py
    does (with the key it advertised), unless told not to."""
    answered = wire.expect(lambda t, e: _in(t, topic) and e["sender"] == target and e["subtopic"] == "RTCAnswer"
                           and _target(e) == name)
    await offer_as(wire, topic, target, name, mallory, key=key, sign_with=sign_with, tag=tag, compact=compact)
    try:
        _, _, env = await asyncio.wait_for(answered, timeout)
    except asyncio.TimeoutError:
        return False
    await mallory.accept(_sdp(env))
    try:
        await eventually(lambda: mallory.is_open(rtchat.CHANNELS), 8, "attacker channels open")
    except AssertionError:
        return False
    mallory.send("connectedViaRTC", "null")
    if prove and sign_with is not None and (tag or "").startswith("rtchat-py/"):
        mallory.send("chat", mallory.identity_frame(topic, name, target, key))
    return True


async def feed(room: rtchat.Room, payloads: list[bytes], chunk: int,
               too_slow_s: float = float("inf")) -> tuple[int, list[float]]:
    """Payloads straight into a room (as the broker hands them over), a chunk at a time, timed: (how many were fed,
    seconds per chunk). Stops once a chunk takes too_slow_s, rather than run for minutes."""
    timings, fed = [], 0
    for start in range(0, len(payloads), chunk):
        started = time.perf_counter()
        for payload in payloads[start:start + chunk]:
            room.network.receive(room.topic, payload)
        timings.append(time.perf_counter() - started)
        fed += len(payloads[start:start + chunk])
        await asyncio.sleep(0)
        if timings[-1] > too_slow_s:
            break
    return fed, timings


async def start_pair(tmp_path, url, names=("alice", "bob"), room="test", **options):
    clients = [await make_client(n, tmp_path, url, **options).start() for n in names]
    rooms = [await c.join(room) for c in clients]
    for r in rooms:
        await r.wait_for_peers(len(names) - 1, 20)
    return clients, rooms


async def close_all(*things) -> None:
    for thing in things:
        if isinstance(thing, Mallory):
            await thing.close()
        elif isinstance(thing, Wire):
            thing.close()
        else:
            await thing.close()


async def reached(predicate, timeout: float = 10) -> bool:
    """Whether predicate() comes true within timeout (an attack that is blocked may never make it true)."""
    try:
        await eventually(predicate, timeout)
        return True
    except AssertionError:
        return False


async def hellos(*rooms: rtchat.Room) -> None:
    """Until every verified rtchat.py peer in these rooms has said hello (its message key is known)."""
    await eventually(lambda: all(p.message_key for r in rooms for p in r.verified_peers()), 10, "hellos")


async def handled(room: rtchat.Room, payloads: list[bytes], what: str = "the payloads") -> None:
    """Until the room's gate has seen every one of these payloads (each is then remembered by its digest)."""
    await eventually(lambda: all(room.gate.knows(p) for p in payloads), 10, f"{room.me} handling {what}")


def phases(room: rtchat.Room, step: str) -> list[str]:
    """The peers whose sessions reach this step of their set-up (see Negotiation and Sessions), as they do."""
    reached: list[str] = []
    for part in (room.negotiation, room.sessions):
        part.on("phase", lambda name, at: reached.append(name) if at == step else None)
    return reached


def probes(room: rtchat.Room) -> list[tuple[str, bool]]:
    """(peer, alive) for every unauthenticated hint the room checked by pinging the session it was about."""
    done: list[tuple[str, bool]] = []
    room.negotiation.on("probed", lambda peer, alive: done.append((peer.name, alive)))
    return done


def shown_counter(room: rtchat.Room) -> dict[str, list]:
    shown = {"message": [], "dm": []}
    room.on("message", shown["message"].append)
    room.on("dm", shown["dm"].append)
    return shown


FORGED_CHATS = ["forged chat 1", "forged chat 2", "forged chat 3"]
FORGED_DMS = ["forged dm 1", "forged dm 2", "forged dm 3"]


def send_forged_text(mallory: Mallory, tag: str = "") -> None:
    """3 chats and 3 DMs, as a browser (JSON strings) and as an rtchat.py peer (t=msg frames)."""
    for i, (chat, dm) in enumerate(zip(FORGED_CHATS, FORGED_DMS, strict=True)):
        if i % 2:
            mallory.send("chat", json.dumps({"t": "msg", "id": rtchat.new_id(), "ts": rtchat.now_ms(),
                                             "text": chat + tag, "action": False, "sig": None}))
            mallory.send("dm", json.dumps({"t": "msg", "id": rtchat.new_id(), "ts": rtchat.now_ms(),
                                           "text": dm + tag, "action": False}))
        else:
            mallory.send("chat", json.dumps(chat + tag))
            mallory.send("dm", json.dumps(dm + tag))


def forged_shown(shown: dict) -> tuple[int, int]:
    chats = sum(1 for m in shown["message"] if m.text.startswith("forged"))
    dms = sum(1 for m in shown["dm"] if m.text.startswith("forged"))
    return chats, dms


# =============================================================================================================
# 1. Forged RTCOffer in bob's name, then chat and DM frames over the data channel it would open
# =============================================================================================================

def test_forged_offer_in_bobs_name_then_chat_and_dm(broker, tmp_path):
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a1"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a1")
        bob_key = bob.identity.public_key_string
        shown = shown_counter(ra)
        changed = []
        ra.on("key-changed", lambda *a: changed.append(a))
        await bob.close()                                   # bob is pinned (he signs) and now away
        await eventually(lambda: "bob" not in ra.peers, 5, "bob gone")
        own = rtchat.Identity.generate()

        # 1a. unsigned, with bob's real (public) key copied from his announcements
        m1 = Mallory(own)
        ok1 = await attach(wire, topic, "alice", "bob", m1, key=bob_key, tag=rtchat.CLIENT_TAG, timeout=2)
        send_forged_text(m1)
        # 1b. signed with the attacker's own key (the only key it can sign with)
        m2 = Mallory(own)
        ok2 = await attach(wire, topic, "alice", "bob", m2, sign_with=own, tag=rtchat.CLIENT_TAG, timeout=2)
        await handled(ra, [p for t, p, e in wire.seen if e and e["sender"] == "bob" and _in(t, topic)], "both offers")
        send_forged_text(m2)
        answers = wire.captured(topic, "alice", "RTCAnswer", target="bob")
        record("1a forged offer as bob, unsigned with bob's key (bob pinned)", not ok1 and not answers,
               f"connected={ok1}, alice answered {len(answers)}x")
        record("1b forged offer as bob, signed with attacker key (bob pinned)", not ok2 and changed,
               f"connected={ok2}, key-changed events={len(changed)}")

        # 1c. first contact: carol has never met bob. The attacker offers in bob's name with bob's real key,
        #     gets a data channel, sends 3 chats and 3 DMs before and after carol's identify question.
        carol = await make_client("carol", tmp_path, broker.url).start()
        announced = wire.expect(lambda t, e: e["sender"] == "carol" and e["subtopic"] == "connect")
        rc = await carol.join("a1")
        await asyncio.wait_for(announced, 5)   # her subscription is in place before the attacker publishes
        shown_c = shown_counter(rc)
        m3 = Mallory(own)
        m3.answer_with = "garbage"                       # it has no private key for bob's public key
        ok3 = await attach(wire, topic, "carol", "bob", m3, key=bob_key, timeout=5)
        send_forged_text(m3, " early")
        await eventually(lambda: m3.questions, 5, "carol's identify question")
        send_forged_text(m3, " late")
        await eventually(lambda: "bob" not in rc.peers, 5, "carol dropping the forged bob")
        chats, dms = forged_shown(shown_c)
        record("1c forged offer as bob at first contact + 3 chats/3 DMs",
               chats == 0 and dms == 0 and "bob" not in rc.peers and rc.sessions.sizes()["early"] == 0 and ok3,
               f"connected={ok3}, shown {chats}/6 chats, {dms}/6 DMs")
        a_chats, a_dms = forged_shown(shown)
        record("1 alice shows 0 of 3 forged chats and 0 of 3 forged DMs", a_chats == 0 and a_dms == 0,
               f"alice showed {a_chats} chats, {a_dms} DMs")
        print(f"[attack 1] alice: {a_chats}/3 forged chats, {a_dms}/3 forged DMs shown; carol: {chats}/6, {dms}/6; "
              f"attacker channel to carol opened={ok3}")
        await close_all(m1, m2, m3, alice, carol, wire)
    run(scenario(), 60)
    assert_blocked("1")


# =============================================================================================================
# 2. A forged RTCAnswer racing the real one
# =============================================================================================================

def test_forged_answer_races_the_real_one(broker, tmp_path):
    """The attacker watches the topic and answers alice's offer to bob first, in bob's name (first contact:
    no pins anywhere, so only signatures protect the session)."""
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a2"
        own = rtchat.Identity.generate()
        attackers: list[Mallory] = []
        forged = {"unsigned": 0, "signed-own-key": 0}

        def race(t, payload, env):
            async def answer(kind):
                m = Mallory(own)
                attackers.append(m)
                sdp = await m.answer(_sdp(env))
                data = {"localDescription": {"type": "answer", "sdp": sdp}, "target": "alice"}
                wire.publish(envelope("bob", "RTCAnswer", data, identity=own if kind != "unsigned" else None,
                                      topic=topic), topic)
                forged[kind] += 1
            for kind in forged:
                asyncio.ensure_future(answer(kind))
        wire.on(lambda t, e: _in(t, topic) and e["sender"] == "alice" and e["subtopic"] == "RTCOffer"
                and _target(e) == "bob", race)

        alice = await make_client("alice", tmp_path, broker.url).start()
        bob = await make_client("bob", tmp_path, broker.url).start()
        ra = await alice.join("a2")
        accepted = []   # the answers alice applied (their DTLS fingerprints)
        ra.negotiation.on("phase", lambda name, step: accepted.append(rtchat.sdp_fingerprint(ra.peers[name].remote_sdp))
                       if step == "answered" and name == "bob" else None)
        publish = bob.signaling.publish

        def slowly(topic, payload):   # bob's network is slow: his real answer comes a second late
            env = rtchat.decode_envelope(payload)
            if env and env["subtopic"] == "RTCAnswer":
                asyncio.get_running_loop().call_later(1.0, publish, topic, payload)
            else:
                publish(topic, payload)
        bob.signaling.publish = slowly
        rb = await bob.join("a2")
        await ra.wait_for_peers(1, 20)
        await rb.wait_for_peers(1, 10)
        peer = ra.peers["bob"]
        bob_fp = rtchat.sdp_fingerprint(rb.peers["alice"].pc.localDescription.sdp)
        hijacked = any(m.pc.connectionState == "connected" for m in attackers)
        bob_answers = [e for t, p, e in wire.seen if _in(t, topic) and e and e["sender"] == "bob"
                       and e["subtopic"] == "RTCAnswer"]
        forged_first = bool(bob_answers) and rtchat.sdp_fingerprint(_sdp(bob_answers[0])) != bob_fp
        assert forged_first, "the race was not won by the attacker: the test proves nothing"
        record("2a forged RTCAnswer (unsigned) racing bob's", forged["unsigned"] and not hijacked
               and accepted == [bob_fp], f"sent={forged['unsigned']}, answers alice applied={len(accepted)}")
        record("2b forged RTCAnswer (signed with attacker key) racing bob's", forged["signed-own-key"]
               and peer.channel_bound and peer.key_string == bob.identity.public_key_string,
               f"sent={forged['signed-own-key']}, attacker pc connected={hijacked}")
        print(f"[attack 2] forged answers sent first: {sum(forged.values())}; alice applied {len(accepted)} answer(s), "
              f"{'only bob' if accepted == [bob_fp] else 'NOT only bob'}'s")
        await close_all(*attackers, alice, bob, wire)
    run(scenario(), 60)
    assert_blocked("2")


# =============================================================================================================
# 3. Forged unload and nameChange in bob's name: bob stays connected
# =============================================================================================================

def test_forged_unload_and_name_change_do_not_disconnect(broker, tmp_path):
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a3"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a3")
        session_a, session_b = ra.peers["bob"], rb.peers["alice"]
        left = []
        ra.on("leave", lambda p, r: left.append(("alice saw", p.name, r)))
        rb.on("leave", lambda p, r: left.append(("bob saw", p.name, r)))
        own = rtchat.Identity.generate()
        # the existing test_room test covers one unsigned unload and nameChange(bob->bob); these go further:
        forged = [envelope("bob", "unload", "disconnecting", identity=own, topic=topic)]  # own key
        forged += [envelope(f"mallory{i}", "nameChange", {"oldName": "bob", "newName": f"mallory{i}"})
                   for i in range(30)]  # "mallory-i renamed from bob": passes the sender == newName check; 30 senders
        forged.append(envelope("bob", "nameChange", {"oldName": "alice", "newName": "bob"}))   # to bob
        forged.append(envelope("alice", "unload", "disconnecting", raw=True))                 # raw-JSON dialect
        for payload in forged:
            wire.publish(payload, topic)
        await handled(ra, forged)
        await handled(rb, forged)   # all refused at once: unsigned in the name of a peer known to sign, or bad
        still = ra.peers.get("bob") is session_a and rb.peers.get("alice") is session_b \
            and session_a.is_verified and session_b.is_verified
        record("3a forged unload/nameChange for a live session (own-key sig, 30 renames, raw dialect)",
               still and not left, f"sessions kept={still}, leave events={left}")

        # 3b. while the session is being set up: bob rejoins; the moment alice's offer to bob is on the wire,
        #     the attacker sends "mallory renamed from bob" and an unsigned unload in bob's name.
        fired = []

        def strike(t, payload, env):
            fired.append(ra.peers.get("bob"))
            wire.publish(envelope("mallory", "nameChange", {"oldName": "bob", "newName": "mallory"}), topic)
            wire.publish(envelope("bob", "unload", "disconnecting"), topic)
            wire.publish(envelope("bob", "unload", "disconnecting", identity=own, topic=topic), topic)
        await bob.leave(rb)
        await eventually(lambda: "bob" not in ra.peers, 5, "bob gone")
        wire.on(lambda t, e: _in(t, topic) and e["sender"] == "alice" and e["subtopic"] == "RTCOffer", strike)
        rb2 = await bob.join("a3")
        try:
            await rb2.wait_for_peers(1, 5)
            await ra.wait_for_peers(1, 2)
            ok = True
        except rtchat.NoPeers:
            ok = False
        target = fired[0] if fired else None
        killed = target is not None and target.state == "closed" and ra.peers.get("bob") is not target
        record("3b forged nameChange/unload while alice's session to bob is connecting",
               fired and ok and not killed,
               f"struck={len(fired)}, reconnected within 5 s={ok}, pending session killed={killed}")
        print(f"[attack 3] live session kept={still}; connecting session killed={killed}, verified again={ok}")
        await close_all(alice, bob, wire)
    run(scenario(), 60)
    assert_blocked("3")


def test_signaling_signed_with_another_message_key(broker, tmp_path):
    """rtchat.py 0.2 signs signaling with its message key. For a peer we know, an offer, answer or unload signed
    with any other message key is not from it: the live session is untouched and no answer goes out."""
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a3m"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a3m")
        await eventually(lambda: ra.peers["bob"].message_key and rb.peers["alice"].message_key, 5, "hellos")
        sa = ra.peers["bob"]
        eve = await make_client("eve", tmp_path, broker.url).start()   # someone alice has met: her key is known
        await eve.join("a3m")
        await eventually(lambda: "eve" in ra.peers and ra.peers["eve"].message_key, 10, "alice meets eve")
        for who, own in (("a stranger's", rtchat.Identity.generate()), ("eve's", eve.identity)):
            m = Mallory(own)
            info = {"client": rtchat.CLIENT_TAG, "inbox": rtchat.new_id()}
            offer = {"userInfo": info, "offer": {"localDescription": {"type": "offer", "sdp": await m.offer()},
                                                 "target": "alice"}}
            before = ra.dropped
            sent = []
            for subtopic, data in (("RTCOffer", offer), ("unload", "disconnecting"), ("connect", info)):
                for where in (topic, ra.inbox):
                    sent.append(envelope("bob", subtopic, data, identity=own, topic=topic, compact=True))
                    wire.publish(sent[-1], where)
            await handled(ra, sent)
            answers = wire.captured(topic, "alice", "RTCAnswer", target="bob")
            record(f"3c offer/unload in known bob's name signed with {who} message key",
                   ra.peers.get("bob") is sa and sa.is_verified and not answers and ra.dropped - before >= 4,
                   f"session kept={ra.peers.get('bob') is sa}, alice answered {len(answers)}x, "
                   f"dropped={ra.dropped - before}")
            record(f"3c a connect signed with {who} message key does not move bob's inbox",
                   ra.network.inbox_of("bob") != f"{topic}/{info['inbox']}",
                   f"bob's inbox at alice={ra.network.inbox_of('bob')}")
            await m.close()
        await close_all(alice, bob, eve, wire)
    run(scenario(), 60)
    assert_blocked("3c")


# =============================================================================================================
# 4. Replays: captured from the wire and re-published later; old and future timestamps
# =============================================================================================================

def test_replays_are_dropped(broker, tmp_path):
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a4"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a4")
        await hellos(ra, rb)
        sa, sb = ra.peers["bob"], rb.peers["alice"]
        alive = lambda: ra.peers.get("bob") is sa and rb.peers.get("alice") is sb and sa.is_verified  # noqa: E731
        old_offers = wire.captured(topic, "alice", "RTCOffer", target="bob")
        genuine = [(t, p) for t, p, e in wire.seen if _in(t, topic) and e and e["sender"] in ("alice", "bob")]
        assert old_offers and genuine

        # 4a. verbatim replay within the window, to the rooms that saw them: duplicates
        before = ra.dropped + rb.dropped
        seen_by_receiver, unseen = 0, {ra: [], rb: []}
        for where, payload in genuine:
            env = rtchat.decode_envelope(payload)
            receiver = rb if env["sender"] == "alice" else ra
            if receiver.gate.knows(payload):
                seen_by_receiver += 1
            elif where == receiver.topic or where == receiver.inbox:
                unseen[receiver].append(payload)   # e.g. alice's announce before bob came
            wire.publish(payload, where)
        await reached(lambda: ra.dropped + rb.dropped - before >= seen_by_receiver)
        for receiver, payloads in unseen.items():
            await handled(receiver, payloads, "what it had not seen")
        record("4a replay of every captured connect/offer/answer (same receivers)",
               alive() and ra.dropped + rb.dropped - before >= seen_by_receiver,
               f"replayed={len(genuine)}, seen before={seen_by_receiver}, "
               f"dropped={ra.dropped + rb.dropped - before}")

        # 4b. old and future timestamps, genuinely signed by bob (a capture from long ago) and unsigned
        before = ra.dropped
        skew = (rtchat.CLOCK_SKEW_S + 30) * 1000
        stale = []
        for stamp in (rtchat.now_ms() - skew, rtchat.now_ms() + skew, 0, 2**53):
            stale += [envelope("bob", "unload", "disconnecting", identity=bob.identity, topic=topic, stamp=stamp),
                      envelope("stranger", "connect", {"publicKeyString": "x"}, stamp=stamp)]
        for payload in stale:
            wire.publish(payload, topic)
        await handled(ra, stale)
        record("4b signed unload / unsigned connect with old or future timestamps", alive()
               and ra.dropped - before >= 8, f"dropped={ra.dropped - before} of 8")

        # 4c. cross-room replay: alice's offer to bob replayed in another room bob is in
        announced = wire.expect(lambda t, e: t == "mrtchat/a4-other" and e["sender"] == "bob"
                                and e["subtopic"] == "connect")
        rb_other = await bob.join("a4-other")
        await asyncio.wait_for(announced, 5)   # bob's subscription is in place before the attacker publishes
        before = rb_other.dropped
        wire.publish(old_offers[0][0], "mrtchat/a4-other")          # signed for room a4: the topic is covered
        await handled(rb_other, [old_offers[0][0]])
        record("4c offer replayed into another room", rb_other.dropped > before and "alice" not in rb_other.peers,
               f"peers there={list(rb_other.peers)}")

        # 4d. replay to a receiver that has restarted (a new Room: its duplicate cache is empty), within the window
        await bob.leave(rb)                       # bob's signed unload is on the wire now: capture it
        rb = await bob.join("a4")
        await rb.wait_for_peers(1, 10)
        await ra.wait_for_peers(1, 5)
        await hellos(ra, rb)
        sa, sb = ra.peers["bob"], rb.peers["alice"]
        bob_unloads = wire.captured(topic, "bob", "unload")
        wire.publish(bob_unloads[-1][0], topic)    # to alice, who saw it: a duplicate
        wire.publish(old_offers[0][0], topic)      # alice's offer of the first session, to bob's new room ...
        wire.publish(old_offers[0][0], old_offers[0][2])   # ... on the room topic and where it first went
        await handled(rb, [old_offers[0][0]])
        await handled(ra, [bob_unloads[-1][0]])
        record("4d alice's old offer replayed to bob's rejoined room (<120 s old)", alive(),
               f"bob's session to alice kept={rb.peers.get('alice') is sb}, "
               f"alice's session kept={ra.peers.get('bob') is sa}")

        # 4e. bob's unload (captured when he left) replayed to alice after she rejoined
        await alice.leave(ra)
        ra = await alice.join("a4")
        await ra.wait_for_peers(1, 10)
        await eventually(lambda: rb.peers.get("alice") is not None and rb.peers["alice"].is_verified, 5, "bob")
        await hellos(ra, rb)
        sa, sb = ra.peers["bob"], rb.peers["alice"]
        wire.publish(bob_unloads[-1][0], topic)
        await handled(ra, [bob_unloads[-1][0]])
        record("4e bob's old unload replayed to alice's rejoined room (<120 s old)", alive(),
               f"alice's session to bob kept={ra.peers.get('bob') is sa}")
        print(f"[attack 4] replayed {len(genuine)} genuine envelopes + 8 stale + cross-room + 2 to fresh rooms")
        await close_all(alice, bob, wire)
    run(scenario(), 60)
    assert_blocked("4")


# =============================================================================================================
# 5. SDP-swapping man in the middle; the post-connect DTLS fingerprint check
# =============================================================================================================

def test_sdp_swapping_mitm_is_dropped(broker, tmp_path):
    async def scenario():
        loop = asyncio.get_running_loop()
        wire = Wire(broker, loop)
        topic = "mrtchat/a5"
        mitm_offers = {"kept": Mallory(), "stripped": Mallory()}     # one DTLS certificate per variant
        mitm_sdps = {k: await m.offer() for k, m in mitm_offers.items()}
        mitm_fps = {k: rtchat.sdp_fingerprint(sdp) for k, sdp in mitm_sdps.items()}
        mitm_answers: list[Mallory] = []
        republished = {"offer-kept-sig": 0, "offer-stripped": 0, "answer-kept-sig": 0, "answer-stripped": 0}

        mine: set[bytes] = set()

        def swap(t, payload, env):
            kind = "offer" if env["subtopic"] == "RTCOffer" else "answer"
            if payload in mine:
                return

            async def go():
                kept = {k: v for k, v in env.items() if k != "data"}
                for variant in ("kept", "stripped"):
                    if kind == "offer":
                        sdp = mitm_sdps[variant]
                    else:
                        m = Mallory()
                        mitm_answers.append(m)
                        offers = wire.captured(topic, env["data"]["target"], "RTCOffer", target=env["sender"])
                        sdp = await m.answer(_sdp(offers[-1][1]))
                    data = json.loads(json.dumps(env["data"]))
                    (data["offer"] if kind == "offer" else data)["localDescription"]["sdp"] = sdp
                    forged = {**kept, "data": data} if variant == "kept" else \
                        {**{k: v for k, v in kept.items() if k not in ("sig", "nonce")}, "data": data}
                    payload = rtchat.encode_envelope(forged)
                    mine.add(payload)
                    wire.publish(payload, t)
                republished[f"{kind}-kept-sig"] += 1
                republished[f"{kind}-stripped"] += 1
            asyncio.ensure_future(go())
        wire.on(lambda t, e: _in(t, topic) and e["subtopic"] in ("RTCOffer", "RTCAnswer")
                and e["sender"] in ("alice", "bob"), swap)

        alice = await make_client("alice", tmp_path, broker.url).start()
        bob = await make_client("bob", tmp_path, broker.url).start()
        ra = await alice.join("a5")
        rb = await bob.join("a5")
        answered, applied = [], []   # the offers bob answered, the answers alice applied (DTLS fingerprints)
        rb.negotiation.on("phase", lambda name, step: answered.append(rtchat.sdp_fingerprint(rb.peers[name].remote_sdp))
                       if step == "answer-sent" else None)
        ra.negotiation.on("phase", lambda name, step: applied.append(rtchat.sdp_fingerprint(ra.peers[name].remote_sdp))
                       if step == "answered" else None)
        try:
            await ra.wait_for_peers(1, 15)
            await rb.wait_for_peers(1, 5)
            connected = True
        except rtchat.NoPeers:
            connected = False
        await eventually(lambda: republished["offer-stripped"] and republished["answer-stripped"], 10, "the MITM")
        await eventually(lambda: all(ra.gate.knows(p) or rb.gate.knows(p) for p in mine), 10, "MITM copies handled")
        pa, pb = ra.peers.get("bob"), rb.peers.get("alice")
        bound = bool(pa and pb and pa.channel_bound and pb.channel_bound)
        record("5a MITM republishes alice's offer with its SDP, signature kept",
               republished["offer-kept-sig"] and mitm_fps["kept"] not in answered,
               f"bob answered {len(answered)} offer(s), this MITM SDP among them={mitm_fps['kept'] in answered}")
        record("5b MITM republishes alice's offer with its SDP, signature stripped (first contact)",
               republished["offer-stripped"] and mitm_fps["stripped"] not in answered and connected and bound,
               f"bob answered {len(answered)} offer(s), {answered.count(mitm_fps['stripped'])} of them the "
               f"stripped MITM copy; alice-bob verified={connected}")
        mitm_answer_fps = {rtchat.sdp_fingerprint(m.pc.localDescription.sdp) for m in mitm_answers
                           if m.pc.localDescription}
        record("5c MITM republishes bob's answer with its SDP (kept / stripped signature)",
               republished["answer-kept-sig"] and not (mitm_answer_fps & set(applied)),
               f"alice applied {len(applied)} answer(s)")
        print(f"[attack 5] MITM republished {republished}; bob answered {len(answered)}, alice applied "
              f"{len(applied)}; channel-bound={bound}")
        await close_all(*mitm_offers.values(), *mitm_answers, alice, bob, wire)
    run(scenario(), 60)
    assert_blocked("5")


def test_identity_frame_is_bound_to_the_channel(broker, tmp_path, monkeypatch):
    """rtchat.py proves identities in the channel. The strongest man in the middle has bob's genuinely signed
    signaling and bob's identity frame, made for the other DTLS session it runs with bob: it is detected as such.
    A frame whose certificate is not of the key that signed the signaling proves nothing, no frame at all is a
    timeout, and the genuine frame (after signaling signed with the message key, or with the RSA key as
    rtchat.py 0.2 may still sign it) verifies."""
    monkeypatch.setattr(rtchat, "VERIFY_TIMEOUT_S", 1.0)

    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a5-id"
        alice = await make_client("alice", tmp_path, broker.url).start()
        bob = rtchat.Identity.generate()                  # what the man in the middle holds of bob's
        announced = wire.expect(lambda t, e: e["sender"] == "alice" and e["subtopic"] == "connect")
        ra = await alice.join("a5-id")
        await asyncio.wait_for(announced, 5)
        outcomes: dict[str, tuple] = {}
        ra.on("mitm-detected", lambda peer, fp: outcomes.setdefault(peer.name, ("mitm", fp)))
        ra.on("verify-failed", lambda peer, reason: outcomes.setdefault(peer.name, ("failed", reason)))
        ra.on("verified", lambda peer: outcomes.setdefault(peer.name, ("verified", peer.channel_bound)))
        elsewhere = rtchat.sdp_fingerprint(await Mallory().offer())   # the certificate of bob's other session
        other = rtchat.Identity.generate()
        attackers = []
        for case in ("relayed", "uncertified", "silent", "genuine", "rsa"):
            m = Mallory(bob)
            attackers.append(m)
            name = f"bob-{case}"
            opened = await attach(wire, topic, "alice", name, m, sign_with=bob, tag=rtchat.CLIENT_TAG,
                                  compact=case != "rsa", prove=False)
            assert opened, f"{case}: no channel"
            if case == "relayed":
                m.send("chat", m.identity_frame(topic, name, "alice", fingerprints=(elsewhere, elsewhere)))
            elif case == "uncertified":
                m.send("chat", json.dumps({**json.loads(m.identity_frame(topic, name, "alice")),
                                           "mcert": other.message_cert}))
            elif case != "silent":
                m.send("chat", m.identity_frame(topic, name, "alice"))
            await eventually(lambda n=name: n in outcomes, 10, f"alice's verdict on {case}")
        record("5d identity frame made for another DTLS session (a relaying man in the middle)",
               outcomes["bob-relayed"] == ("mitm", bob.fingerprint) and "bob-relayed" not in ra.peers,
               f"outcome={outcomes['bob-relayed']}")
        record("5e identity frame whose certificate is not of the key that signed the signaling",
               outcomes["bob-uncertified"] == ("failed", "bad-identity"), f"outcome={outcomes['bob-uncertified']}")
        record("5f no identity frame", outcomes["bob-silent"] == ("failed", "no-identity"),
               f"outcome={outcomes['bob-silent']}")
        record("5g the check is not vacuous: the frame for this session is accepted (compact and RSA signaling)",
               outcomes["bob-genuine"] == outcomes["bob-rsa"] == ("verified", True),
               f"outcomes={outcomes['bob-genuine']}, {outcomes['bob-rsa']}")
        await close_all(*attackers, alice, wire)
    run(scenario(), 60)
    assert_blocked("5d")
    assert_blocked("5e")
    assert_blocked("5f")
    assert_blocked("5g")


# =============================================================================================================
# 6. Impersonation of a pinned name, under --trust new, known and any
# =============================================================================================================

def test_impersonating_a_pinned_name(broker, tmp_path):
    async def scenario():
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a6")
        changed = []
        ra.on("key-changed", lambda name, fp, verdict: changed.append((name, verdict)))
        shown = shown_counter(ra)
        (tmp_path / "evil").mkdir()

        async def impostor(name, outcome):
            """A second rtchat.py client called name, with a key of its own, in alice's room, until outcome()
            (what alice makes of it) holds; if alice verified it, it says something forged."""
            client = await make_client(name, tmp_path / "evil", broker.url).start()
            room = await client.join("a6")
            key = client.identity.public_key_string
            await eventually(outcome, 15, f"alice's verdict on the impostor {name}")
            verified = [p for p in ra.peers.values() if p.key_string == key and p.is_verified]
            if verified:
                said = len(shown["message"])
                room.send("forged chat from the impostor")
                await eventually(lambda: len(shown["message"]) > said, 5, "the impostor's line at alice")
            return client, room, verified

        # 6a. --trust new, while the real bob is connected: a second rtchat.py "bob" with a new key (it never
        #     hears alice, who is busy with bob and does not announce), then the attacker's own signed offers as
        #     "bob" and "bob(7)" (same bare name, so the same pin)
        client, room, verified = await impostor("bob", lambda: ("bob", "changed") in changed)
        # rtchat.py 0.2: its signaling is signed by a message key that is not bob's: ignored, and alice is told
        record("6a second rtchat.py client 'bob' with a new key while bob is online (--trust new)",
               not verified and ra.peers["bob"].is_verified and ("bob", "changed") in changed,
               f"verified={verified}, key-changed={changed}")
        await client.close()
        wire = Wire(broker, asyncio.get_running_loop())
        own = rtchat.Identity.generate()
        session = ra.peers["bob"]
        for name in ("bob", "bob(7)", "bob|x"):
            changed.clear()
            m = Mallory(own)
            offer = await offer_as(wire, "mrtchat/a6", "alice", name, m, sign_with=own, tag=rtchat.CLIENT_TAG)
            await handled(ra, [offer])
            answered = name in ra.peers and ra.peers[name] is not session   # a session for it would be there now
            record(f"6a impostor offer as {name!r} signed with a new key while bob is online (--trust new)",
                   not answered and ra.peers["bob"] is session and session.is_verified and (name, "changed") in changed,
                   f"answered={answered}, key-changed={changed}")
            await m.close()
        wire.close()
        # 6b. --trust known: the pinned bob is accepted; strangers and impostors are refused
        await bob.close()
        await eventually(lambda: "bob" not in ra.peers, 5, "bob gone")
        alice.trust.policy = "known"
        changed.clear()
        refused = ra.gate.drops["forged"]   # alice offers to the new "bob", whose answer is not signed by bob
        client, room, verified = await impostor("bob", lambda: ra.gate.drops["forged"] > refused)
        record("6b impostor 'bob' with a new key (--trust known)", not verified,
               f"verified={verified}, key-changed={changed}")
        await client.close()
        client, room, verified = await impostor("dave", lambda: ("dave", "new") in changed)
        record("6b stranger 'dave' never pinned (--trust known)", not verified and ("dave", "new") in changed,
               f"verified={verified}, key-changed={changed}")
        await client.close()
        # 6c. --trust any: documented to accept every key, but it must not re-pin bob's name to the impostor
        alice.trust.policy = "any"
        ra.retry("bob")   # alice gives up her attempt with the last "bob", which left (as /trust bob does)
        client, room, verified = await impostor("bob", lambda: any(
            p.is_verified and p.fingerprint != bob.identity.fingerprint for p in ra.peers.values()))
        bob_pins = set(alice.trust.pins_for("bob"))
        record("6c impostor 'bob' under --trust any does not get pinned as bob",
               bob_pins == {bob.identity.fingerprint},
               f"connected={bool(verified)} (by design), pins for bob now={len(bob_pins)} "
               f"(impostor pinned={client.identity.fingerprint in bob_pins})")
        msgs = [m for m in shown["message"] if m.text.startswith("forged")]
        record("6c impostor messages carry the impostor's fingerprint, not bob's",
               all(m.fingerprint != bob.identity.fingerprint for m in msgs), f"{len(msgs)} shown (policy any)")
        await client.close()
        alice.trust.policy = "new"
        verdict = alice.trust.verdict("bob", client.identity.public_key_string)
        record("6d after --trust any, back to --trust new: the impostor's key is still 'changed' for bob",
               verdict == "changed", f"verdict={verdict}")
        print(f"[attack 6] key-changed events: {changed}")
        await close_all(alice)
    run(scenario(), 90)
    assert_blocked("6")


# =============================================================================================================
# 7. Answers are routed by (peer, n): a third peer cannot answer alice's question to bob
# =============================================================================================================

def test_third_peer_cannot_answer_for_bob(broker, tmp_path):
    async def scenario():
        (alice, bob, carol), (ra, rb, rc) = await start_pair(tmp_path, broker.url, ("alice", "bob", "carol"), "a7")

        async def slow(q):
            await asyncio.sleep(1.0)
            return "real answer from bob"
        bob.questions["slow"] = slow
        to_alice = rc.peers["alice"]

        async def spam():
            for _ in range(10):
                for n in range(64):
                    to_alice.send("answer", {"n": n, "answer": "forged by carol",
                                             "question": {"topic": "slow", "content": None}})
                COUNTS["frames"] += 64
                await asyncio.sleep(0.05)
        spammer = asyncio.ensure_future(spam())
        started = time.monotonic()
        answers = [await ra.ask("bob", "slow", timeout=5) for _ in range(2)]
        took = time.monotonic() - started
        await spammer
        record("7 carol floods answer frames with n=0..63 while alice asks bob",
               answers == ["real answer from bob"] * 2 and ra.peers["carol"].is_verified,
               f"answers={answers}, took {took:.1f} s")
        await close_all(alice, bob, carol)
    run(scenario(), 60)
    assert_blocked("7")


# =============================================================================================================
# 8. A raw aiortc "browser" with a key that fails the identity check: nothing it says is shown
# =============================================================================================================

def test_unverified_browser_attacker_is_not_shown(broker, tmp_path, monkeypatch):
    monkeypatch.setattr(rtchat, "VERIFY_TIMEOUT_S", 1.5)

    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a8"
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("a8")
        shown = shown_counter(ra)
        failed = {}
        ra.on("verify-failed", lambda peer, reason: failed.setdefault(peer.name, reason))
        own, other = rtchat.Identity.generate(), rtchat.Identity.generate()
        variants = {  # how the attacker fails: name -> (answer_with, advertised key)
            "mallory-garbage": ("garbage", own.public_key_string),
            "mallory-otherkey": ("valid", other.public_key_string),   # proves a key it did not advertise
            "mallory-wrongn": ("wrong-n", own.public_key_string),      # valid signature, wrong question number
            "mallory-stale": ("other-challenge", own.public_key_string),
            "mallory-silent": ("none", own.public_key_string),
        }
        attackers = {}
        for name, (how, _key) in variants.items():
            m = Mallory(own)
            m.answer_with = how
            attackers[name] = m

        async def go(name, m):
            ok = await attach(wire, topic, "alice", name, m, key=variants[name][1])
            send_forged_text(m, f" from {name}")
            for label in ("ping", "question"):
                m.send(label, json.dumps({"n": 0, "question": {"topic": "time", "content": None}}))
            await eventually(lambda: m.questions, 5, f"alice's identify question to {name}")
            send_forged_text(m, f" from {name}")
            return ok
        opened = await asyncio.gather(*(go(n, m) for n, m in attackers.items()))
        await eventually(lambda: not any(n in ra.peers for n in attackers), 6, "alice dropping all of them")
        chats, dms = forged_shown(shown)
        for (name, m), ok in zip(attackers.items(), opened, strict=True):
            asked = [q["question"]["topic"] for q in m.questions]
            pongs = sum(1 for label, _ in m.inbox if label == "pong")
            record(f"8 {name}: connected, fails identify, its chat/DM not shown",
                   ok and "identify" in asked and name not in ra.peers and pongs == 0
                   and failed.get(name) == "challenge-failed",
                   f"channel opened={ok}, asked={asked}, pongs from alice={pongs}, verify-failed={failed.get(name)}")
        record("8 total forged text shown from unverified peers", chats == 0 and dms == 0,
               f"{chats}/{6 * len(attackers)} chats, {dms}/{6 * len(attackers)} DMs shown")
        assert ra.sessions.sizes()["early"] == 0 and not ra.verified_peers()
        print(f"[attack 8] {len(attackers)} unverified attackers connected={sum(opened)}; "
              f"forged shown: {chats} chats, {dms} DMs")
        await close_all(*attackers.values(), alice, wire)
    run(scenario(), 60)
    assert_blocked("8")


# =============================================================================================================
# 9. Terminal injection: what reaches the Printer has no escapes or control characters
# =============================================================================================================

NASTY = [
    "\x1b[2J\x1b[H\x1b[31mRED", "\x1b]0;owned title\x07", "\x1b]52;c;cHduZWQ=\x07", "\x1b]8;;http://evil\x1b\\link",
    "\x9b31m8-bit CSI", "\x9d0;osc\x9c", "\x1bPdcs\x1b\\", "nul\x00byte", "bell\x07", "back\x08\x08space",
    "carriage\rreturn", "\u202eevil\u202c", "\u2066isolate\u2069", "zero\u200bwidth", "\ufeffbom", "del\x7f",
    "\ud800lone surrogate", "\x1b", "\x1b[", "\x1b\x1b[0m", "tab\there", "\U000e0041tag",
]
FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
OWN_SGR = re.compile(r"\x1b\[(?:\d+|2;3|1;33)m")


def _leaks(text: str, color: bool) -> list[str]:
    if color:
        text = OWN_SGR.sub("", text)
    return sorted({repr(c) for c in FORBIDDEN.findall(text)} | ({"ESC"} if "\x1b" in text else set()))


def test_terminal_injection_is_neutralised(broker, tmp_path):
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a9"
        alice = await make_client("alice", tmp_path, broker.url).start()
        printers = {(style, color): rtchat.Printer(style, color, out=io.StringIO(), err=io.StringIO())
                    for style, color in (("chat", False), ("chat", True), ("plain", False), ("json", False))}
        apps = [rtchat.App(alice, rtchat.Registry(), p) for p in printers.values()]
        await apps[0].switch_room("a9")
        ra = apps[0].room
        for app in apps[1:]:
            await app.switch_room("a9")  # the same room of the same client, shown by each printer
        shown = shown_counter(ra)
        own = rtchat.Identity.generate()
        names = ["\x1b]0;pwn\x07ev\x1b[1mil", "\u202eeve\u202c", "nul\x00name", "\x9b2Jc1", "z" * 80]
        attackers = []
        candidates = [(name, Mallory(own if i == 0 else rtchat.Identity.generate())) for i, name in enumerate(names)]
        opened = await asyncio.gather(*(attach(wire, topic, "alice", name, m, sign_with=m.identity,
                                               tag=rtchat.CLIENT_TAG, timeout=2) for name, m in candidates))
        for (name, m), ok in zip(candidates, opened, strict=True):
            if not ok:                                      # a name refused outright is fine too
                await m.close()
                continue
            attackers.append((name, m))
            m.unlimit()
            await eventually(lambda n=name: any(p.is_verified for p in ra.peers.values() if p.name == n), 5, "in")
            for text in NASTY + ["x" * 300000, "y" * 200000 + "\x1b[31m", "\n".join(NASTY)]:
                m.send("chat", json.dumps(text))
                m.send("dm", json.dumps(text))
                m.send("chat", json.dumps({"t": "msg", "id": rtchat.new_id(), "ts": rtchat.now_ms(), "text": text,
                                           "action": True}))
            m.send("chat", json.dumps({"t": "backfill", "authors": {}, "msgs": [
                {"id": rtchat.new_id(), "from": n, "text": t, "ts": rtchat.now_ms(), "fingerprint": None}
                for n in NASTY[:10] for t in NASTY[:3]]}))
            COUNTS["frames"] += 3 * (len(NASTY) + 3) + 1
        # What they said is taken in order, up to the message over 256 KiB, which ends each session: the leave
        # lines carry their names too.
        await eventually(lambda: not any(name in ra.peers for name, _ in attackers), 10, "the attackers dropped")
        for _, m in attackers:
            await m.close()
        ra.emit("key-changed", names[0], own.fingerprint, "changed")   # the key-changed line, with a nasty name
        ra.emit("status", "\x1b[31mstatus\x07 from a plugin")
        leaks = {}
        for (style, color), printer in printers.items():
            text = printer.out.getvalue() + printer.err.getvalue()
            found = _leaks(text, color)
            if style == "json":                             # what a script reading --json would print
                for line in printer.out.getvalue().splitlines():
                    value = json.loads(line)
                    found += _leaks(" ".join(str(v) for v in value.values()), False)
            leaks[f"{style}{'+color' if color else ''}"] = sorted(set(found))
            record(f"9 {style}{' +color' if color else ''} output has no escapes/control/bidi characters",
                   not found, f"leaked {sorted(set(found))[:8]}")
        record("9 nasty names connected and their messages were shown (the check is not vacuous)",
               attackers and len(shown["message"]) > 20, f"{len(attackers)} connected, {len(shown['message'])} shown")
        longest = max((len(m.text) for m in shown["message"]), default=0)
        record("9 huge messages are cut", longest <= rtchat.MAX_TEXT_CHARS, f"longest shown={longest}")
        print(f"[attack 9] {len(attackers)} attackers with hostile names, {len(shown['message'])} messages and "
              f"{len(shown['dm'])} DMs shown; leaks per style: {leaks}")
        await close_all(alice, wire)
    run(scenario(), 60)
    assert_blocked("9")


def test_printer_unit_neutralises_peer_strings():
    """Printer directly: peer-controlled names (sender, to, relayed_by) and cleaned text, every style."""
    for style, color in (("chat", False), ("chat", True), ("plain", False), ("json", False)):
        printer = rtchat.Printer(style, color, out=io.StringIO(), err=io.StringIO())
        for nasty in NASTY:
            for kind in ("message", "dm"):
                msg = rtchat.Message(id="x", room="r", sender=nasty[:80], text=rtchat.clean(nasty, keep_newlines=True),
                                     ts=rtchat.now_ms(), kind=kind, to=nasty[:80], relayed_by=nasty[:80],
                                     action=kind == "message")
                printer.message(msg, "alice")
        text = printer.out.getvalue() + printer.err.getvalue()
        found = _leaks(text, color)
        record(f"9u Printer.message({style}{', color' if color else ''}) with hostile sender/to/relayed_by",
               not found, f"leaked {found[:8]}")
    assert_blocked("9u")


# =============================================================================================================
# 10. Fuzz: thousands of malformed MQTT payloads and data-channel frames while two peers chat
# =============================================================================================================

def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fuzz_payloads(rng: random.Random, genuine: list[bytes], count: int, topic: str) -> list[bytes]:
    texts = [t for t in (rtchat.lz_decompress(p) for p in genuine) if t]
    senders = ["alice", "bob", "", "x" * 81, "bob(1)", "bob|x", "\x1b[2J"]

    def rand_env():
        return {"sender": rng.choice([rng.choice(senders), f"s{rng.randrange(10**6)}", 5, None, ["bob"]]),
                "timestamp": rng.choice([rtchat.now_ms(), "now", None, True, -1, 1e308, rtchat.now_ms() + 0.5]),
                "subtopic": rng.choice(["connect", "RTCOffer", "RTCAnswer", "RTCIceCandidate", "unload",
                                        "nameChange", "x" * 100, 7, "py:signed"]),
                "data": rng.choice([None, 1, "s", [], {}, {"offer": "x"}, {"offer": {"target": "alice"}},
                                    {"offer": {"target": "alice", "localDescription": {"sdp": "v=0\r\nbogus"}},
                                     "userInfo": {"publicKeyString": 5}},
                                    {"target": "alice", "localDescription": {"type": "answer", "sdp": 5}},
                                    {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": []},
                                    {"candidate": "garbage " * 50, "usernameFragment": "u"},
                                    {"oldName": "bob", "newName": None}, {"publicKeyString": "{" * 3000}]),
                **({"sig": rng.choice(["", "!!", "A" * 400, 5]), "nonce": rng.choice(["n", 5, "z" * 100])}
                   if rng.random() < 0.4 else {})}
    out = []
    for i in range(count):
        kind = i % 14
        if kind == 0:
            out.append(os.urandom(rng.choice([1, 2, 3, 8, 64, 999, 4096])))
        elif kind == 1:
            out.append(os.urandom(rng.choice([2, 16, 512, 8192, 30000])))          # even: lz-string garbage
        elif kind == 2 and genuine:                                              # byte flips in real envelopes
            b = bytearray(rng.choice(genuine))
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(bytes(b))
        elif kind == 3 and genuine:                                              # cut, doubled, spliced
            b = rng.choice(genuine)
            cut = rng.randrange(1, len(b))
            out.append(rng.choice([b[:cut], b[cut:], b + b, b[:cut] + os.urandom(rng.randint(1, 9)) + b[cut:]]))
        elif kind == 4 and texts:                                                # mutated JSON, recompressed
            t = list(rng.choice(texts))
            for _ in range(rng.randint(1, 4)):
                t[rng.randrange(len(t))] = rng.choice('{}[]":,\\0aZ\x00\u202e')
            out.append(rtchat.lz_compress("".join(t)))
        elif kind == 5:
            out.append(rtchat.lz_compress(json.dumps(rand_env())) if i % 2 else json.dumps(rand_env()).encode())
        elif kind == 6:                                                          # deep JSON
            depth = rng.choice([1000, 5000, 30000])
            text = rng.choice(["[" * depth, '{"a":' * depth, '{"sender":"x","timestamp":1,"subtopic":"connect",'
                               '"data":' + "[" * depth + "]" * depth + "}"])
            out.append(text.encode() if rng.random() < 0.5 else rtchat.lz_compress(text[:40000]))
        elif kind == 7:                                                          # not UTF-8
            out.append(b"\xff\xfe" + os.urandom(rng.randrange(1, 200)) + b"{")
        elif kind == 8:                                                          # well-formed, fresh, wrong shapes
            env = rand_env()
            env.update(sender=f"fz{rng.randrange(10**6)}", timestamp=rtchat.now_ms(), nonce=rtchat.new_id())
            out.append(rtchat.encode_envelope(env))
        elif kind == 9:                                                          # "renamed from bob", "bob left"
            s = f"fz{rng.randrange(10**6)}"
            out.append(envelope(s, "nameChange", {"oldName": rng.choice(["alice", "bob"]), "newName": s}))
            out.append(envelope(rng.choice(["alice", "bob"]), "unload", "disconnecting"))
        elif kind == 10 and i % 140 == 10:                                       # big: near and over the caps
            blob = "".join(rng.choice("ab") for _ in range(rng.choice([60000, 300000])))
            out.append(rtchat.lz_compress(blob)[: rtchat.MAX_PAYLOAD_BYTES + rng.choice([0, 2])])
        elif kind == 11 and genuine:                                             # verbatim replays
            out.append(rng.choice(genuine))
        elif kind == 12:                                                         # candidates for nobody/anybody
            out.append(envelope(f"fz{rng.randrange(10**6)}", "RTCIceCandidate",
                                {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
                                 "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "abcd"}))
        else:
            out.append(json.dumps(rand_env(), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return out[:count]


def fuzz_frames(rng: random.Random) -> list[tuple[str, str]]:
    labels = list(rtchat.CHANNELS) + ["chat", "dm", "question", "answer"]
    frames: list[tuple[str, str]] = []
    shapes = [
        "not json", "{", "", "null", "1e999999", "[]", "{}", "true", '"\\ud800"', '"x"', "5", "-0",
        "[" * 20000 + "]" * 20000, '{"a":' * 5000 + "1" + "}" * 5000,
        json.dumps({"n": "0", "answer": 1}), json.dumps({"n": 2**70, "question": None}),
        json.dumps({"n": 0, "question": {"topic": "identify", "content": "short"}}),
        json.dumps({"n": 0, "question": {"topic": "challenge", "content": "\u0100" * 32}}),
        json.dumps({"n": 1, "question": {"topic": 5}}), json.dumps({"n": 1, "question": {"topic": "x" * 1000}}),
        json.dumps({"t": "msg", "id": 5, "text": None, "ts": "1"}),
        json.dumps({"t": "msg", "id": "x" * 100, "text": "t", "ts": 1}),
        json.dumps({"t": "msg", "id": "fz", "text": "t", "ts": True}),
        json.dumps({"t": "ack", "ids": "x"}), json.dumps({"t": "ack", "ids": list(range(5000))}),
        json.dumps({"t": "hello", "mkey": "A" * 44, "mcert": "B" * 344}), json.dumps({"t": "hello"}),
        json.dumps({"t": "sync", "ids": "all"}), json.dumps({"t": "sync", "ids": [None] * 2000}),
        json.dumps({"t": "backfill", "authors": [], "msgs": {}}),
        json.dumps({"t": "backfill", "authors": {"fp": "x"}, "msgs": [1, None, {"id": 1}, {"from": [], "text": {}}]}),
        json.dumps({"t": "backfill", "authors": {}, "msgs": [
            {"id": f"b{i}", "from": "bob", "text": "forged via backfill", "ts": "x" if i % 2 else 1, "sig": "AA=="}
            for i in range(50)]}),
        json.dumps({"t": "batch", "sig": "A" * 88, "leaves": "A" * 44, "ids": ["fz"]}),
        json.dumps({"t": "batch", "sig": 5, "leaves": ["x"], "ids": "all"}),
        json.dumps({"t": "batch", "sig": "A" * 88, "leaves": "A" * 44 * 200, "ids": [None] * 200}),
        json.dumps({"t": "batch", "sig": "A" * 88, "leaves": "A" * 88, "ids": [{"id": 1}, 2**70]}),
        json.dumps({"t": "backfill", "authors": {}, "msgs": [
            {"id": "b0", "from": "bob", "text": "t", "ts": 1, "salt": "s" * 16, "sig": "AA==",
             "proof": {"at": -1, "of": 2**70, "path": 5}}]}),
        json.dumps({"t": 5}), json.dumps({"t": None, "ids": []}), '"pong"', '"ping"', "null",
    ]
    for label in labels:
        for shape in shapes:
            frames.append((label, shape))
    for _ in range(600):
        label = rng.choice(labels)
        frames.append((label, rng.choice([
            os.urandom(rng.randrange(1, 300)).decode("latin-1"),
            json.dumps(rng.choice(shapes))[: rng.randrange(1, 400)],
            json.dumps({"n": rng.randrange(-5, 100), "answer": "forged", "question": {"topic": "identify"}}),
        ])))
    for label in ("chat", "dm", "question", "answer", "streamoffer"):   # huge: just under and over the frame cap
        frames.append((label, json.dumps("h" * 200000)))
        frames.append((label, "[" + "1," * 140000 + "1]"))
    frames.append(("chat", json.dumps("g" * 600000)))
    return frames


def test_fuzz_while_chatting(broker, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="rtchat")

    async def scenario():
        rng = random.Random(20240601)
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a10"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a10")
        got = {"alice": [], "bob": []}
        ra.on("message", got["alice"].append)
        rb.on("message", got["bob"].append)
        sa, sb = ra.peers["bob"], rb.peers["alice"]
        left = []
        ra.on("leave", lambda p, r: left.append(("alice", p.name, r)))
        rb.on("leave", lambda p, r: left.append(("bob", p.name, r)))
        rss_before = _rss_kb()
        fds_before = len(os.listdir("/proc/self/fd"))

        # a connected, channel-bound attacker peer of the attacker's own (it has a key; it is a stranger)
        own = rtchat.Identity.generate()
        mallory = Mallory(own)
        assert await attach(wire, topic, "alice", "aardvark", mallory, sign_with=own, tag=rtchat.CLIENT_TAG)
        await eventually(lambda: "aardvark" in ra.peers and ra.peers["aardvark"].is_verified, 5, "attacker in")
        mallory.unlimit()

        for i in range(5):
            ra.send(f"before a{i}")
            rb.send(f"before b{i}")
        await eventually(lambda: len(got["alice"]) >= 5 and len(got["bob"]) >= 5, 5, "chat before")
        before = (len(got["alice"]), len(got["bob"]))

        genuine = [p for t, p, e in wire.seen if _in(t, topic) and e and e["sender"] in ("alice", "bob")]
        payloads = fuzz_payloads(rng, genuine, 3000, topic)
        frames = fuzz_frames(rng)
        dropped_before = ra.dropped + rb.dropped
        chatting = {"sent": 0}

        async def chat_on():
            while not done.is_set():
                ra.send(f"during a{chatting['sent']}")
                rb.send(f"during b{chatting['sent']}")
                chatting["sent"] += 1
                await asyncio.sleep(0.1)
        done = asyncio.Event()
        chatter = asyncio.ensure_future(chat_on())
        started = time.monotonic()
        for i in range(0, len(payloads), 100):
            for payload in payloads[i:i + 100]:
                wire.publish(payload, topic)
            for label, text in frames[i // 100 * len(frames) // 30:(i // 100 + 1) * len(frames) // 30]:
                try:
                    mallory.send(label, text)
                except Exception:
                    pass
            await asyncio.sleep(0.05)
        COUNTS["payloads"] += len(payloads)
        COUNTS["frames"] += len(frames)
        marker = envelope("fuzz-done", "connect", {"client": rtchat.CLIENT_TAG})   # handled after every payload
        wire.publish(marker, topic)
        await handled(ra, [marker])
        await handled(rb, [marker])
        # the frames end with messages over 256 KiB, which end the attacker's session (all before it are taken)
        await eventually(lambda: "aardvark" not in ra.peers, 10, "the attacker dropped")
        done.set()
        await chatter
        fuzz_s = time.monotonic() - started
        for i in range(5):
            ra.send(f"after a{i}")
            rb.send(f"after b{i}")
        try:
            await eventually(lambda: sum(m.text.startswith("after") for m in got["bob"]) == 5
                             and sum(m.text.startswith("after") for m in got["alice"]) == 5, 10, "chat after")
            after_ok = True
        except AssertionError:
            after_ok = False
        during = (sum(m.text.startswith("during") for m in got["bob"]),
                  sum(m.text.startswith("during") for m in got["alice"]))
        sizes = {r.me: {**r.gate.sizes(), **r.sessions.sizes(), **r.negotiation.sizes(),
                        "known": r.ledger.journal.known_count} for r in (ra, rb)}
        rss_growth = _rss_kb() - rss_before
        fds = len(os.listdir("/proc/self/fd")) - fds_before
        errors = [f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
                  for r in caplog.records if r.levelno >= logging.ERROR]
        forged_backfill = sum(1 for m in got["alice"] if m.text == "forged via backfill" and m.trust != "unverified")
        record("10 fuzz: no crash, no forced disconnect", ra.peers.get("bob") is sa and rb.peers.get("alice") is sb
               and sa.is_verified and not [x for x in left if x[1] in ("alice", "bob")] and not errors,
               f"left={left[:3]}, errors={errors[:3]}")
        record("10 fuzz: chat goes on during and after", after_ok and min(during) >= chatting["sent"] - 1,
               f"during sent={chatting['sent']} got={during}, after ok={after_ok}")
        record("10 fuzz: internal state bounded",
               all(s["nonces"] <= len(payloads) + 200 and s["rates"] <= 4097 and s["candidate_senders"] <= 256
                   and s["candidates_each"] <= rtchat.MAX_PENDING_CANDIDATES and s["early"] <= 200
                   and s["peers"] <= 40 and s["warned"] <= 1025 for s in sizes.values()) and rss_growth < 300_000,
               f"sizes={sizes}, rss +{rss_growth // 1024} MiB, fds +{fds}")
        record("10 fuzz: nothing forged shown as verified", forged_backfill == 0,
               f"{forged_backfill} relayed forgeries")
        print(f"[attack 10] {len(payloads)} MQTT payloads + {len(frames)} data-channel frames in {fuzz_s:.1f} s; "
              f"dropped {ra.dropped + rb.dropped - dropped_before} envelopes; chat before={before}, "
              f"during sent {chatting['sent']} each way, got {during}; after ok={after_ok}; "
              f"rss +{rss_growth // 1024} MiB; fds +{fds}; sizes {sizes}")
        await close_all(mallory, alice, bob, wire)
    run(scenario(), 90)
    assert_blocked("10")


def test_offer_flood_from_many_names_is_bounded(broker, tmp_path):
    """Unsigned offers with a valid SDP from 120 made-up names: each one costs alice a PeerConnection."""
    async def scenario():
        wire = Wire(broker, asyncio.get_running_loop())
        topic = "mrtchat/a11"
        (alice, bob), (ra, rb) = await start_pair(tmp_path, broker.url, room="a11")
        sa = ra.peers["bob"]
        mallory = Mallory()
        sdp = await mallory.offer()
        fds_before, rss_before = len(os.listdir("/proc/self/fd")), _rss_kb()
        flood = []
        for i in range(120):
            data = {"userInfo": {"publicKeyString": rtchat.Identity.generate().public_key_string if i < 2 else None},
                    "offer": {"localDescription": {"type": "offer", "sdp": sdp}, "target": "alice"}}
            flood.append(envelope(f"flood{i}", "RTCOffer", data))
            wire.publish(flood[-1], topic)
        COUNTS["payloads"] += 120
        await handled(ra, flood)
        peak_peers = len(ra.peers)
        pcs = sum(1 for p in ra.peers.values() if p.state == "connecting")   # each one a PeerConnection
        fds = len(os.listdir("/proc/self/fd")) - fds_before
        got = []
        rb.on("message", got.append)
        ra.send("still here")
        await eventually(lambda: got, 5, "chat after the flood")
        record("11 offer flood from 120 names: pending sessions bounded",
               pcs <= rtchat.MAX_PENDING_SESSIONS and sa.is_verified,
               f"pending PeerConnections={pcs}, peers={peak_peers}, fds +{fds}, "
               f"rss +{(_rss_kb() - rss_before) // 1024} MiB")
        print(f"[attack 11] 120 unsigned offers: alice holds {pcs} pending PeerConnections, fds +{fds}")
        await close_all(mallory, alice, bob, wire)
    run(scenario(), 60)
    assert_blocked("11")


def test_nonce_cache_under_flood_is_bounded_and_cheap(broker, tmp_path):
    """40 000 fresh, well-formed envelopes from made-up senders straight into a room: every one is taken (each
    costs the same: a cache that rescanned itself for each new entry would not get through them within the test's
    bound), and the cache stays bounded."""
    async def scenario():
        alice = await make_client("alice", tmp_path, broker.url).start()
        ra = await alice.join("a12")
        chunk, total = 1000, 40000
        payloads = [envelope(f"n{i}", "py:noise", None, nonce=f"{i:x}", raw=True) for i in range(total)]
        fed, timings = await feed(ra, payloads, chunk)
        COUNTS["payloads"] += fed
        size = ra.gate.sizes()["nonces"]
        record(f"12 nonce cache under a flood of {fed} fresh envelopes: all taken, cache bounded",
               fed == total and ra.dropped == 0 and size <= rtchat.MAX_NONCES,
               f"size={size}, dropped={ra.dropped}, seconds per {chunk}: {[round(t, 2) for t in timings]}")
        print(f"[attack 12] nonce cache {size} entries after {fed}; s/{chunk}: {[round(t, 2) for t in timings]}")
        await alice.close()
    run(scenario(), 60)
    assert_blocked("12")


# =============================================================================================================
# 13. A peer's candidates in the no-route diagnosis: its SDP says what types they are
# =============================================================================================================

def test_hostile_candidate_types_stay_out_of_the_no_route_line(monkeypatch):
    """An offer whose candidates all carry terminal escapes as their type: nothing to check, so the session ends
    as no-route, and none of the peer's types reach the facts or the line."""
    monkeypatch.setattr(rtchat, "NO_PATH_AFTER_S", 1.0)

    async def scenario():
        rtchat.restrict_ice_hosts(["127.0.0.1"])
        ice = rtchat.ice_configuration([])
        mallory, ours = rtchat.Peer("mallory", ice), rtchat.Peer("mallory", ice)
        offer = await mallory.create_offer()
        line = re.search(r"a=candidate:[^\r\n]*", offer).group(0)
        head = line.split(" 127.0.0.1 ")[0]
        junk = ["".join(nasty.split())[:24] for nasty in NASTY]
        sdp = offer.replace(line, "\r\n".join(f"{head} 127.0.0.1 {9 + i} typ {t}" for i, t in enumerate(junk)))
        events = []
        ours.on("no-route", lambda peer, facts: events.append(facts))
        await ours.accept_offer(sdp)
        await eventually(lambda: events, 10, "the no-route event")
        facts = events[0]
        text = rtchat.no_route_text("mallory", facts, None)
        record("13 hostile candidate types in the no-route facts and line",
               facts["theirs"] == [] and not _leaks(text + json.dumps(facts), False)
               and ours.state == "closed", f"facts={facts!r}, text={text!r}")
        mallory.close()
    run(scenario(), 30)
    assert_blocked("13")


# =============================================================================================================
# 14. A relaying member (issue 15, item 3): alice and bob have no network path; carol, whom both reach, passes
#     their messages on, and is hostile. dave, who joins later, relays honestly.
# =============================================================================================================

async def _relay_room(tmp_path, broker_url, names=("alice", "bob", "carol")):
    clients = [await make_client(n, tmp_path, broker_url).start() for n in names]
    rooms = [await c.join("hostile-relay") for c in clients]
    return clients, rooms


def _through(room) -> dict:
    return {r.name: [p.name for p in r.via] for r in room.relayed_peers()}


HOSTILE_RELAYS = {
    # what carol does with each frame alice asks her to pass on: returns the frames bob gets instead
    "drops": lambda value, mine: [],
    "alters": lambda value, mine: [{**value, "d": {**value["d"], "m": {**value["d"]["m"], "text": "pay mallory"}}}
                                   if value["d"].get("t") == "msg" else value],
    "replays": lambda value, mine: [value] * 5,
    "forges": lambda value, mine: [{**value, "d": {"t": "msg", "m": mine(value["d"].get("m", {}))}}],
}


@pytest.mark.parametrize("behaviour", sorted(HOSTILE_RELAYS))
def test_a_relaying_member_cannot_alter_forge_drop_or_replay(broker, tmp_path, pathless, monkeypatch, behaviour):
    """carol passes on alice's lines to bob as `behaviour` says, and answers alice with an ack in bob's name that
    bob never signed. bob shows nothing carol altered or forged, and each line once; alice does not count bob as
    delivered on carol's word: she sends again, and once dave relays, the genuine line reaches bob through him,
    acknowledged by bob."""
    pathless.add("alice", "bob")
    monkeypatch.setattr(rtchat, "RELAY_ACK_WAIT_S", 0.5)

    async def scenario():
        clients, (ra, rb, rc) = await _relay_room(tmp_path, broker.url)
        got_b, forged_acks = [], []
        rb.on("message", got_b.append)
        carol_key = clients[2].identity

        def mine(record):   # carol's own words under alice's name, signed by carol's message key
            forged = dict(record, text="forged by carol", salt=rtchat.new_id())
            forged["id"] = rtchat.message_id("alice", forged.get("fingerprint"), forged.get("ts", 0),
                                             forged["text"], False, forged["salt"])
            forged["sig"] = carol_key.sign_message(rtchat.signed_bytes(
                "message", ra.topic, "alice", forged["id"], forged.get("ts", 0), forged["text"], False))
            return forged

        def hostile(peer, value):
            if not isinstance(value.get("d"), dict) or value["d"].get("t") not in ("msg", "box"):
                return rc.ledger.routes.__class__.on_relay(rc.ledger.routes, peer, value)
            for frame in HOSTILE_RELAYS[behaviour](value, mine):
                rc.peers["bob"].send("chat", {"t": "relayed", "from": "alice", "d": frame["d"]})
            ids = [value["d"].get("m", {}).get("id")]
            sig = carol_key.sign_message(rtchat.signed_bytes("relay-ack", ra.topic, "bob", "alice", ids))
            peer.send("chat", {"t": "relayed", "from": "bob", "d": {"t": "ack", "ids": ids, "sig": sig}})
            forged_acks.append(ids[0])
        rc.ledger.routes.on_relay = hostile
        await eventually(lambda: _through(ra) == {"bob": ["carol"]} and "alice" in _through(rb), 30,
                         "alice and bob reached through carol")
        sent = ra.send("meet at noon")
        resent = 1 if behaviour == "replays" else 2   # (a replayed genuine line is acked by bob: not sent again)
        await eventually(lambda: len(forged_acks) >= resent, 10, "carol's forged acks, and alice sending again")
        early = [m.text for m in got_b]
        held = "bob" in ra.ledger.awaiting(sent.id) or behaviour == "replays"
        dave = await make_client("dave", tmp_path, broker.url).start()
        await dave.join("hostile-relay")
        await eventually(lambda: [m.text for m in got_b if m.id == sent.id] == ["meet at noon"], 20,
                         "the genuine line reaching bob")
        await eventually(lambda: not ra.ledger.awaiting(sent.id), 20, "bob's own ack")
        texts = [m.text for m in got_b]
        record(f"14 relay {behaviour}: nothing altered or forged shown, each line once, no forged ack taken",
               held and "pay mallory" not in texts and "forged by carol" not in texts
               and texts.count("meet at noon") == 1 and set(early) <= {"meet at noon"},
               f"texts={texts}, early={early}, held={held}")
        await dave.close()
        for c in clients:
            await c.close()
    run(scenario(), 90)
    assert_blocked(f"14 relay {behaviour}")


def test_a_relaying_member_that_delays_and_reorders_loses_nothing(broker, tmp_path, pathless):
    """carol holds alice's lines and passes them on late, newest first: bob shows each once, with alice's time
    stamps (so in the order she wrote them when sorted), and alice gets bob's acks for all."""
    pathless.add("alice", "bob")

    async def scenario():
        clients, (ra, rb, rc) = await _relay_room(tmp_path, broker.url)
        got_b, held = [], []
        rb.on("message", got_b.append)
        honest = rc.ledger.routes.on_relay
        rc.ledger.routes.on_relay = lambda peer, value: held.append((peer, value)) \
            if value.get("d", {}).get("t") == "msg" else honest(peer, value)
        await eventually(lambda: _through(ra) == {"bob": ["carol"]} and "alice" in _through(rb), 30, "the route")
        sent = [ra.send(f"line {n}") for n in range(5)]
        await eventually(lambda: len(held) >= 5, 10, "carol holding five lines")
        for peer, value in reversed(held):
            honest(peer, value)
        await eventually(lambda: len({m.id for m in got_b}) == 5, 10, "all five at bob")
        ok = await ra.flush(10)
        stamps = {m.id: m.ts for m in got_b}
        record("14 relay delays and reorders: each line once, stamped as written, all acked",
               ok and len(got_b) == 5 and [stamps[m.id] for m in sent] == [m.ts for m in sent],
               f"got={[m.text for m in got_b]}, flushed={ok}")
        for c in clients:
            await c.close()
    run(scenario(), 60)
    assert_blocked("14 relay delays")


def test_a_member_flooding_through_a_relay_is_bounded(broker, tmp_path, pathless):
    """alice (a verified member gone bad) asks carol to pass 5,000 junk boxes to bob: carol passes on at most her
    budget and says she is busy; bob opens at most his budget of them and shows nothing. carol (gone bad too) then
    tells bob 1,000 times that she reaches made-up members: bob checks at most his budget of such frames, and his
    tables stay bounded."""
    pathless.add("alice", "bob")

    async def scenario():
        clients, (ra, rb, rc) = await _relay_room(tmp_path, broker.url, ("alice", "bob", "carol"))
        await eventually(lambda: "alice" in _through(rb), 30, "the route")
        alice_at_carol, bob_at_carol = rc.peers["alice"], rc.peers["bob"]
        passed, opened = [], []
        send = bob_at_carol.send_reply
        bob_at_carol.send_reply = lambda label, value: (passed.append(1), send(label, value))[1]
        refusals = []
        ra.on("relay-refused", lambda peer, why: refusals.append(why))
        open_box = clients[1].identity.open_box
        clients[1].identity.open_box = lambda box, context: (opened.append(1), open_box(box, context))[1]
        junk = {"t": "box", "k": "QUFB", "n": "QUFBQUFBQUFBQUFB", "c": "QUFB"}
        for _ in range(5000):
            ra.peers["carol"].send("chat", {"t": "relay", "to": ["bob"], "d": junk})
        await eventually(lambda: "busy" in refusals, 20, "carol saying she is busy")
        # carol tells bob, 1,000 times, that she reaches members with made-up keys
        bob_gets = rb.peers["carol"]
        for n in range(1000):
            fake = rtchat.Identity(clients[2].identity.private_key)   # (a certificate that holds, each time anew)
            rc.peers["bob"].send("chat", {"t": "reach", "relay": True, "peers": {f"m{n}": {
                "key": fake.public_key_string, "mkey": fake.message_public, "mcert": fake.message_cert}}})
        await eventually(lambda: bob_gets.over_budget.get("reach"), 20, "bob dropping reach frames")
        await asyncio.sleep(0.5)   # what was in flight arrives
        sizes = rb.ledger.routes.sizes()
        record("14 relay flood: carol passes on at most her budget, bob opens at most his",
               len(passed) <= rtchat.RELAY_BUDGET[1] + 2 * rtchat.RELAY_BUDGET[0]
               and len(opened) <= rtchat.BOX_BUDGET[1] + 2 * rtchat.BOX_BUDGET[0]
               and not rb.history(5) and sizes["pending"] == 0 and alice_at_carol.over_budget.get("relay")
               and sizes["keys"] <= 4 * rtchat.MAX_REACH and sizes["remotes"] <= rtchat.REACH_BUDGET[1] + 20,
               f"passed={len(passed)}, opened={len(opened)}, sizes={sizes}")
        for c in clients:
            await c.close()
    run(scenario(), 90)
    assert_blocked("14 relay flood")


def test_a_relay_cannot_read_a_direct_message_or_swap_keys(broker, tmp_path, pathless):
    """A direct message through carol is sealed to bob's key: carol's own key opens nothing of it, and the
    frames she passes hold no plaintext. bob met alice before (her key is pinned): carol telling him another key
    for alice is not believed, and words signed by that key are not shown."""
    async def scenario():
        clients, (ra, rb, rc) = await _relay_room(tmp_path, broker.url)
        await eventually(lambda: ra.peers.get("bob") and ra.peers["bob"].is_verified, 30, "alice meeting bob")
        for client in clients:
            await client.leave(client.rooms["hostile-relay"])
        pathless.add("alice", "bob")   # from now on they have no path
        ra, rb, rc = [await c.join("hostile-relay-2") for c in clients]
        frames, got_b = [], []
        rb.on("dm", got_b.append)
        rb.on("message", got_b.append)
        honest = rc.ledger.routes.on_relay
        rc.ledger.routes.on_relay = lambda peer, value: (frames.append(value), honest(peer, value))
        await eventually(lambda: "bob" in _through(ra) and "alice" in _through(rb), 30, "the route")
        trusted = rb.relayed_peers()[0].trust
        ra.dm("bob", "the vault code is 7319")
        await eventually(lambda: got_b, 10, "bob's dm")
        box = next(f["d"] for f in frames if f["d"].get("t") == "box")
        context = rtchat.signed_bytes("relay-box", ra.topic, "alice", "bob")
        unreadable = clients[2].identity.open_box(box, context) is None and "7319" not in rtchat.to_json(frames)
        # carol now tells bob that alice's key is one of hers, and passes on words signed by it
        impostor = rtchat.Identity.generate()
        fake = {"key": impostor.public_key_string, "mkey": impostor.message_public, "mcert": impostor.message_cert}
        rb.ledger.routes.on_reach(rb.peers["carol"], {"relay": True, "peers": {"alice": fake}})
        fp = rtchat.fingerprint(impostor.public_key_string)
        stamp, salt = rtchat.now_ms(), rtchat.new_id()
        msg_id = rtchat.message_id("alice", fp, stamp, "forged", False, salt)
        sig = impostor.sign_message(rtchat.signed_bytes("message", rb.topic, "alice", msg_id, stamp, "forged", False))
        rb.peers["carol"].send("chat", {"t": "relayed", "from": "alice", "d": {"t": "msg", "m": {
            "id": msg_id, "from": "alice", "text": "forged", "ts": stamp, "action": False, "fingerprint": fp,
            "sig": sig, "salt": salt}}})
        await asyncio.sleep(0.5)   # (nothing is to come: what would have come by now)
        believed = any(r.fingerprint == fp for r in rb.relayed_peers())
        record("14 relay reads a sealed dm, or swaps a pinned key",
               unreadable and trusted == "relayed" and not believed
               and [m.text for m in got_b] == ["the vault code is 7319"],
               f"unreadable={unreadable}, trust={trusted}, believed={believed}, got={[m.text for m in got_b]}")
        for c in clients:
            await c.close()
    run(scenario(), 60)
    assert_blocked("14 relay reads")
