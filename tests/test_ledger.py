"""The Ledger alone: plain values in (frames from verified peers, what the user says), frames and events out.

Each peer is a real rtchat.Peer with no connection whose send records what the ledger hands it: that list is the
ledger's real output, as wormhole's `events`. The history log is a real HistoryLog in tmp_path.
"""
from __future__ import annotations

import json
import os
import types

import pytest
from conftest import run

import rtchat

TOPIC = "mrtchat/ledger"
IDENTITIES = {name: rtchat.Identity.generate() for name in ("me", "alice", "carol")}


class Link(rtchat.Peer):
    """A verified peer as the ledger sees it; sent records every frame the ledger hands it."""

    def __init__(self, name: str, tag: str | None = rtchat.CLIENT_TAG, hello: bool = True,
                 batches: bool = True) -> None:
        """tag None: a browser; batches False: an rtchat.py 0.2, whose hello does not take batch signatures."""
        identity = IDENTITIES[name]
        super().__init__(name, rtchat.ice_configuration([]), rtchat.RTCHAT_PY if tag else rtchat.BROWSER,
                         key_string=identity.public_key_string, client_tag=tag)
        self.identity = identity
        self.state, self.channel_bound = "verified", tag is not None
        if hello and tag is not None:
            self.message_key, self.late_signatures = identity.message_public, batches
        self.sent: list[tuple[str, object]] = []
        self.got = rtchat.Pulse()   # fires with each frame sent

    def send(self, label: str, value) -> bool:
        self.sent.append((label, json.loads(rtchat.to_json(value))))  # as it would travel
        self.got.fire()
        return True

    def send_paced(self, label: str, value) -> bool:
        return self.send(label, value)

    async def writable(self, label: str, below: int, timeout: float) -> bool:
        return True

    def frames(self, kind: str) -> list[dict]:
        return [value for _, value in self.sent if isinstance(value, dict) and value.get("t") == kind]

    async def until_sent(self, kind: str) -> list[dict]:
        """The frames of this kind sent, once there is one (at most 5 s)."""
        await self.got.until(lambda: bool(self.frames(kind)), 5)
        return self.frames(kind)

    def hello(self) -> dict:
        return {"t": "hello", "mkey": self.identity.message_public, "mcert": self.identity.message_cert,
                "late_sigs": True, "batches": True}


class Setup:
    """A ledger in room 'ledger' as 'me', with its state and history in tmp_path; events records what it emits."""

    def __init__(self, tmp_path, pins: tuple[str, ...] = ()) -> None:
        self.store = rtchat.Store(tmp_path / "me.json")
        self.store.load()
        self.trust = rtchat.Trust(self.store)
        for name in pins:
            self.trust.pin(name, IDENTITIES[name].public_key_string, signs=True)
        self.log = rtchat.HistoryLog(tmp_path / "me.history.jsonl")
        self.events: list[tuple] = []
        self.emitted = rtchat.Pulse()   # fires with each event
        self.scope = rtchat.Scope("ledger", TOPIC, "me", IDENTITIES["me"], self.store, self.trust)
        self.ledger = rtchat.Ledger(self.scope, self.log, self.emit)

    def emit(self, *event) -> None:
        self.events.append(event)
        self.emitted.fire()

    def seen(self, kind: str) -> list:
        return [event[1:] for event in self.events if event[0] == kind]

    def stored(self) -> dict[str, dict]:
        return {e["id"]: e for e in self.log.entries()}


def said(name: str, text: str, salt: str | None = None, sign: bool = False) -> rtchat.Message:
    """A message as name's rtchat.py would make it: its id bound to its words."""
    msg = rtchat.Message(id="", room="ledger", sender=name, text=text, ts=rtchat.now_ms(),
                         fingerprint=IDENTITIES[name].fingerprint, salt=salt or rtchat.new_id())
    msg.id = msg.bound_id()
    if sign:
        msg.sig = IDENTITIES[name].sign_message(msg.signed_part(TOPIC))
    return msg


def frame(msg: rtchat.Message, **extra) -> dict:
    return {"t": "msg", "id": msg.id, "ts": msg.ts, "text": msg.text, "action": msg.action, "salt": msg.salt,
            **extra}


def batch_frame(identity: rtchat.Identity, msgs: list[rtchat.Message], mine: set[str]) -> dict:
    """What an author sends after a batch of its messages: one signature, the leaves, the ids the receiver got."""
    leaves = [rtchat.batch_leaf(m.signed_part(TOPIC)) for m in msgs]
    return {"t": "batch", "sig": identity.sign_batch(rtchat.batch_tree(leaves)[-1][0], len(leaves)),
            "leaves": rtchat.encode_hashes(leaves),
            "ids": [m.id if m.id in mine else None for m in msgs]}


# -- the batch tree (RFC 9162) ------------------------------------------------------------------------------------

async def relay_that_asked(s) -> tuple[Link, list[rtchat.Message], list]:
    """carol, verified, whose hello made the ledger ask her for history; and three old lines of alice's with the
    Merkle tree over them, for carol to pass on."""
    relay = Link("carol")
    s.ledger.peer_verified(relay)
    s.ledger.on_frame(relay, "chat", relay.hello())
    await relay.until_sent("sync")
    msgs = [said("alice", f"old {i}") for i in range(3)]
    return relay, msgs, rtchat.batch_tree([rtchat.batch_leaf(m.signed_part(TOPIC)) for m in msgs])


def rfc9162_root(leaves: list[bytes]) -> bytes:
    """RFC 9162's own definition: split at the largest power of two below the count."""
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return rtchat.hashlib.sha256(b"\x01" + rfc9162_root(leaves[:split]) + rfc9162_root(leaves[split:])).digest()


def test_every_audit_path_leads_to_the_root_and_only_from_its_place():
    for count in range(1, 40):
        leaves = [rtchat.batch_leaf(os.urandom(8)) for _ in range(count)]
        tree = rtchat.batch_tree(leaves)
        root = tree[-1][0]
        assert root == rfc9162_root(leaves)
        for at in range(count):
            path = rtchat.batch_path(tree, at)
            assert rtchat.batch_root(leaves[at], at, count, path) == root
            assert len(path) <= (count - 1).bit_length()
            if count > 1:
                assert rtchat.batch_root(leaves[at], (at + 1) % count, count, path) != root
                assert rtchat.batch_root(leaves[(at + 1) % count], at, count, path) != root
            assert rtchat.batch_root(leaves[at], count, count, path) is None
    # a path alone does not always pin the count (leaf 0 of 3 and of 4): the signature covers it
    msgs = [said("alice", f"m{i}") for i in range(3)]
    leaves = [rtchat.batch_leaf(m.signed_part(TOPIC)) for m in msgs]
    tree = rtchat.batch_tree(leaves)
    path = rtchat.batch_path(tree, 0)
    msgs[0].sig, msgs[0].proof = IDENTITIES["alice"].sign_batch(tree[-1][0], 3), rtchat.batch_proof(0, 3, path)
    assert msgs[0].is_signed_by(IDENTITIES["alice"].message_public, TOPIC)
    assert rtchat.batch_root(leaves[0], 0, 4, path) == tree[-1][0]
    msgs[0].proof = rtchat.batch_proof(0, 4, path)
    assert not msgs[0].is_signed_by(IDENTITIES["alice"].message_public, TOPIC)


@pytest.mark.parametrize("proof", [None, 5, {"at": 0, "of": 1}, {"at": True, "of": 2, "path": ""},
                                   {"at": 2, "of": 2, "path": ""}, {"at": 0, "of": rtchat.MAX_BATCH + 1, "path": ""},
                                   {"at": 0, "of": 2, "path": ["A" * 44]}, {"at": 0, "of": 2, "path": "A" * 43},
                                   {"at": 0, "of": 2, "path": "AAAA"}, {"at": 0, "of": 2, "path": "A" * 44 * 9}])
def test_malformed_proofs_are_not_proofs(proof):
    assert rtchat.batch_proof_fields(proof) is None


# -- messages in ---------------------------------------------------------------------------------------------------

def test_a_live_message_is_shown_written_then_acknowledged(tmp_path):
    async def scenario():
        s = Setup(tmp_path)
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        msg = said("alice", "hello\tthere", sign=True)
        s.ledger.on_frame(alice, "chat", frame(msg, sig=msg.sig))
        assert [m.text for (m,) in s.seen("message")] == ["hello\tthere"]   # shown at once, exactly as sent
        assert not alice.frames("ack")                                       # not on disk yet
        assert await s.ledger.written(5)
        assert alice.frames("ack") == [{"t": "ack", "ids": [msg.id]}]
        kept = s.stored()[msg.id]
        assert kept["trust"] == "channel-bound" and kept["sig"] == msg.sig and kept["fingerprint"] == msg.fingerprint
        s.ledger.on_frame(alice, "chat", frame(msg, sig=msg.sig))           # a resend: acked again, not shown again
        assert len(s.seen("message")) == 1 and len(alice.frames("ack")) == 2
        await s.ledger.close()
    run(scenario())


def test_ids_are_bound_to_author_and_words(tmp_path):
    """Other words under an id, a 0.2 message (an id of its own choosing), a browser's plain text."""
    async def scenario():
        s = Setup(tmp_path)
        alice, old, browser = Link("alice"), Link("carol", batches=False), Link("me", tag=None)
        for peer in (alice, old, browser):
            s.ledger.peer_verified(peer)
        real = said("alice", "the real words")
        s.ledger.on_frame(alice, "chat", {**frame(real), "text": "squatted"})
        assert not s.seen("message")
        legacy_id = rtchat.new_id()
        s.ledger.on_frame(old, "chat", {"t": "msg", "id": legacy_id, "ts": rtchat.now_ms(), "text": "from 0.2",
                                        "action": False})
        s.ledger.on_frame(browser, "dm", "from a browser")
        ((kept_old,),), ((kept_browser,),) = s.seen("message"), s.seen("dm")
        assert kept_old.id != legacy_id and kept_old.id == kept_old.bound_id() and kept_old.salt == legacy_id
        assert kept_browser.trust == "legacy" and kept_browser.id == kept_browser.bound_id()
        assert await s.ledger.written(5)
        assert old.frames("ack") == [{"t": "ack", "ids": [legacy_id]}] and not browser.frames("ack")
        assert set(s.stored()) == {kept_old.id, kept_browser.id}
        await s.ledger.close()
    run(scenario())


def test_a_batch_signature_follows_its_messages(tmp_path, monkeypatch):
    """alice's messages come ahead of their signature; one batch frame signs them (a message of the batch that
    went to someone else is only a leaf here). Each is kept with the signature and its own proof and checks alone;
    one whose leaf is not the one named is kept without; one whose batch never comes is written unsigned."""
    monkeypatch.setattr(rtchat, "SIGNATURE_WAIT_S", 0.3)

    async def scenario():
        s = Setup(tmp_path)
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        ours = [said("alice", f"line {i}") for i in range(3)]
        elsewhere = said("alice", "a dm to carol")
        for msg in ours:
            s.ledger.on_frame(alice, "chat", frame(msg))
        assert len(s.seen("message")) == 3
        assert s.ledger.journal.idle and not s.stored() and not alice.frames("ack")   # waiting for the signature
        other = said("alice", "other words than the ones alice sent")
        batch = batch_frame(alice.identity, [ours[0], elsewhere, ours[1], other], {m.id for m in ours} | {other.id})
        batch["ids"][3] = ours[2].id   # named, but the leaf signed there is not ours[2]'s
        s.ledger.on_frame(alice, "chat", batch)
        assert await s.ledger.written(5)
        stored = s.stored()
        for msg in ours[:2]:
            kept = rtchat.Message.from_dict(stored[msg.id])
            assert kept.proof["of"] == 4 and kept.is_signed_by(alice.identity.message_public, TOPIC)
        assert "sig" not in stored[ours[2].id]
        assert sorted(i for f in alice.frames("ack") for i in f["ids"]) == sorted(m.id for m in ours)
        late = said("alice", "its batch never comes")
        s.ledger.on_frame(alice, "chat", frame(late))
        assert await s.ledger.journal.done.until(lambda: late.id in s.stored(), 5)   # at its deadline
        assert "sig" not in s.stored()[late.id]
        await s.ledger.close()
    run(scenario())


def test_per_message_signatures_of_rtchat_py_0_2_are_taken(tmp_path):
    async def scenario():
        s = Setup(tmp_path)
        old = Link("carol", batches=False)
        s.ledger.peer_verified(old)
        msg = said("carol", "signed later, one by one")
        s.ledger.on_frame(old, "chat", frame(msg))
        s.ledger.on_frame(old, "chat", {"t": "sigs", "sigs": {msg.id: old.identity.sign_message(
            msg.signed_part(TOPIC))}})
        assert await s.ledger.written(5)
        kept = rtchat.Message.from_dict(s.stored()[msg.id])
        assert kept.proof is None and kept.is_signed_by(old.identity.message_public, TOPIC)
        await s.ledger.close()
    run(scenario())


def test_forged_batches_and_proofs_are_refused(tmp_path):
    """Attacks on batch signatures. Malformed batch frames sign nothing (the messages are written unsigned, nothing
    breaks); relayed history is dropped when its proof is moved to another message, names another count, or its
    batch was signed by a key that is not the author's."""
    async def scenario():
        s = Setup(tmp_path, pins=("alice",))
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        msg = said("alice", "waits for its batch")
        s.ledger.on_frame(alice, "chat", frame(msg))
        leaf = rtchat.encode_hashes([rtchat.batch_leaf(msg.signed_part(TOPIC))])
        sig = alice.identity.sign_batch(rtchat.batch_leaf(msg.signed_part(TOPIC)), 1)
        for forged in ({"t": "batch", "sig": 5, "leaves": leaf, "ids": [msg.id]},
                       {"t": "batch", "sig": sig, "leaves": [leaf], "ids": [msg.id]},
                       {"t": "batch", "sig": sig, "leaves": leaf, "ids": msg.id},
                       {"t": "batch", "sig": sig, "leaves": leaf, "ids": [msg.id, None]},
                       {"t": "batch", "sig": sig, "leaves": leaf * (rtchat.MAX_BATCH + 1),
                        "ids": [msg.id] * (rtchat.MAX_BATCH + 1)},
                       {"t": "batch", "sig": sig, "leaves": "not base64!", "ids": [msg.id]},
                       {"t": "batch", "sig": sig, "leaves": leaf, "ids": [{"id": msg.id}]}):
            s.ledger.on_frame(alice, "chat", forged)
        assert await s.ledger.written(5)
        assert "sig" not in s.stored()[msg.id]          # still waiting when written: unsigned, not wrongly signed

        relay, msgs, tree = await relay_that_asked(s)
        root = tree[-1][0]

        def record(i: int, signer: str = "alice", at: int | None = None, count: int = 3) -> dict:
            at = i if at is None else at
            return {"id": msgs[i].id, "from": "alice", "text": msgs[i].text, "ts": msgs[i].ts, "action": False,
                    "salt": msgs[i].salt, "fingerprint": msgs[i].fingerprint,
                    "sig": IDENTITIES[signer].sign_batch(root, 3),
                    "proof": rtchat.batch_proof(at, count, rtchat.batch_path(tree, at))}
        authors = {IDENTITIES["alice"].fingerprint: {"key": IDENTITIES["alice"].public_key_string,
                                                     "mkey": IDENTITIES["alice"].message_public,
                                                     "mcert": IDENTITIES["alice"].message_cert}}
        forged = [record(0, at=1), record(1, count=4), record(2, signer="carol")]
        s.ledger.on_frame(relay, "chat", {"t": "backfill", "authors": authors, "msgs": forged})
        assert not s.seen("history")
        s.ledger.on_frame(relay, "chat", {"t": "backfill", "authors": authors, "msgs": [record(0)]})
        assert [(m.text, m.trust) for (m,) in s.seen("history")] == [("old 0", "relayed")]   # the genuine one
        await s.ledger.close()
    run(scenario())


# -- messages out --------------------------------------------------------------------------------------------------

def test_what_we_say_goes_out_then_one_signature_per_batch(tmp_path):
    """To a browser as text, to rtchat.py as frames; after the write one batch frame per peer and channel, its ids
    naming only what that peer got; an ack clears what flush waits for. An rtchat.py peer that takes no batch
    signature (0.2) makes every message go out signed inline."""
    async def scenario():
        s = Setup(tmp_path)
        alice, browser = Link("alice"), Link("carol", tag=None)
        s.ledger.peer_verified(alice)
        s.ledger.peer_verified(browser)
        sent = [s.ledger.send(f"hi {i}", i == 1, [alice, browser]) for i in range(2)]
        direct = s.ledger.dm(alice, "alice", "just you")
        assert [v for label, v in browser.sent if label == "chat"] == ["hi 0", "* me hi 1"]
        assert [f["id"] for f in alice.frames("msg")] == [m.id for m in (*sent, direct)]
        assert all("sig" not in f for f in alice.frames("msg"))
        assert s.ledger.unacknowledged() == {"alice"} and not await s.ledger.flush(0.3)
        assert await s.ledger.written(5)
        chat, dm = [(label, f) for label, f in alice.sent if isinstance(f, dict) and f.get("t") == "batch"]
        assert chat[0] == "chat" and chat[1]["ids"] == [sent[0].id, sent[1].id, None]
        assert dm[0] == "dm" and dm[1]["ids"] == [None, None, direct.id] and dm[1]["sig"] == chat[1]["sig"]
        stored = s.stored()
        for msg in (*sent, direct):
            kept = rtchat.Message.from_dict(stored[msg.id])
            assert kept.sig == msg.sig and kept.is_signed_by(IDENTITIES["me"].message_public, TOPIC)
        s.ledger.on_frame(alice, "chat", {"t": "ack", "ids": [m.id for m in sent]})
        s.ledger.on_frame(alice, "dm", {"t": "ack", "ids": [direct.id]})
        assert await s.ledger.flush(1) and not s.ledger.unacknowledged()
        assert [event[0] for event in s.seen("delivered")] == [direct.id]
        old = Link("carol", batches=False)
        s.ledger.peer_verified(old)
        inline = s.ledger.send("signed at once", False, [alice, old])
        assert alice.frames("msg")[-1]["sig"] == inline.sig == old.frames("msg")[-1]["sig"] and inline.proof is None
        await s.ledger.close()
    run(scenario())


def test_a_dm_to_someone_away_is_queued_then_delivered(tmp_path):
    async def scenario():
        s = Setup(tmp_path, pins=("alice",))
        queued = s.ledger.dm(None, "alice", "when you are back")
        assert s.seen("queued") == [(queued,)] and [m.id for m in s.ledger.outbox()] == [queued.id]
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        (out,) = [f for label, f in alice.sent if label == "dm"]
        assert out["id"] == queued.id and out["sig"] == queued.sig
        s.ledger.on_frame(alice, "dm", {"t": "ack", "ids": [queued.id]})
        assert s.seen("delivered") == [(queued.id, alice)] and not s.ledger.outbox()
        await s.ledger.close()
    run(scenario())


# -- history passed on ---------------------------------------------------------------------------------------------

def test_sync_answers_with_what_was_taken_before_it_asked(tmp_path):
    """A line we said just before a newcomer was verified did not go to it live and is not on disk yet when it
    asks what it missed: the answer waits for it. Signed in a batch, it goes with its proof to a peer that checks
    batches; to one that does not (0.2), as ours, it goes signed alone."""
    async def scenario():
        s = Setup(tmp_path)
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        before = s.ledger.send("said while carol was connecting", False, [alice])
        carol = Link("carol")
        s.ledger.peer_verified(carol)
        s.ledger.on_frame(carol, "chat", carol.hello())
        s.ledger.on_frame(carol, "chat", {"t": "sync", "ids": []})
        assert not s.stored()                      # not on disk yet: the answer waits
        await s.ledger.written(5)
        await carol.until_sent("backfill")
        (answer,) = carol.frames("backfill")
        (record,) = answer["msgs"]
        assert record["id"] == before.id and record["proof"] == before.proof and record["sig"] == before.sig
        assert answer["authors"][IDENTITIES["me"].fingerprint]["mkey"] == IDENTITIES["me"].message_public
        old = Link("carol", batches=False)
        s.ledger.peer_verified(old)
        s.ledger.on_frame(old, "chat", {"t": "sync", "ids": []})
        await old.until_sent("backfill")
        (record,) = old.frames("backfill")[0]["msgs"]   # ours: signed alone for it
        assert "proof" not in record and rtchat.verify_message(IDENTITIES["me"].message_public, record["sig"],
                                                               before.signed_part(TOPIC))
        assert old.frames("backfill")[0]["authors"][IDENTITIES["me"].fingerprint]["mkey"] == \
            IDENTITIES["me"].message_public
        await s.ledger.close()
    run(scenario())


def test_history_passed_on_is_checked_against_its_author(tmp_path):
    """From bob (a stand-in named carol here): alice's batch-signed words count as checked when alice is pinned;
    the same words altered, or signed by another key, are dropped; at most BACKFILL_MAX records per sync."""
    async def scenario():
        s = Setup(tmp_path, pins=("alice",))
        relay, msgs, tree = await relay_that_asked(s)
        sig = IDENTITIES["alice"].sign_batch(tree[-1][0], 3)
        records = [{"id": m.id, "from": "alice", "text": m.text, "ts": m.ts, "action": False, "salt": m.salt,
                    "fingerprint": m.fingerprint, "sig": sig,
                    "proof": rtchat.batch_proof(i, 3, rtchat.batch_path(tree, i))}
                   for i, m in enumerate(msgs)]
        altered = {**records[2], "text": "altered"}
        altered["id"] = rtchat.Message(id="", room="", sender="alice", text="altered", ts=msgs[2].ts,
                                       fingerprint=msgs[2].fingerprint, salt=msgs[2].salt).bound_id()
        authors = {IDENTITIES["alice"].fingerprint: {"key": IDENTITIES["alice"].public_key_string,
                                                     "mkey": IDENTITIES["alice"].message_public,
                                                     "mcert": IDENTITIES["alice"].message_cert}}
        s.ledger.on_frame(relay, "chat", {"t": "backfill", "authors": authors, "msgs": records[:2] + [altered]})
        shown = s.seen("history")
        assert [(m.text, m.trust, m.relayed_by) for (m,) in shown] == [("old 0", "relayed", "carol"),
                                                                      ("old 1", "relayed", "carol")]
        s.ledger.on_frame(relay, "chat", {"t": "backfill", "authors": authors, "msgs": [{}] * rtchat.BACKFILL_MAX})
        s.ledger.on_frame(relay, "chat", {"t": "backfill", "authors": authors, "msgs": records[2:]})
        assert len(s.seen("history")) == 2         # over what we asked for
        assert not s.seen("message")               # passed on: history, never news
        await s.ledger.close()
    run(scenario())


# -- the disk ------------------------------------------------------------------------------------------------------

def test_a_disk_that_refuses_is_said_once_and_nothing_is_acked_until_it_takes_it(tmp_path):
    async def scenario():
        s = Setup(tmp_path)
        s.log.path.symlink_to(tmp_path / "elsewhere")   # refused as a symbolic link: every write fails
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        msgs = [said("alice", f"line {i}", sign=True) for i in range(3)]
        for msg in msgs:
            s.ledger.on_frame(alice, "chat", frame(msg, sig=msg.sig))
        assert await s.emitted.until(lambda: bool(s.seen("disk-error")), 5)
        (path, reason), = s.seen("disk-error")
        assert path == str(s.log.path) and "symbolic link" in reason and not alice.frames("ack")
        s.log.path.unlink()
        assert await s.ledger.written(5)
        assert s.seen("disk-ok") == [(str(s.log.path),)] and len(s.seen("disk-error")) == 1
        assert sorted(i for f in alice.frames("ack") for i in f["ids"]) == sorted(m.id for m in msgs)
        await s.ledger.close()
    run(scenario())


def test_a_compaction_that_fails_is_an_event_not_a_sentence(tmp_path, monkeypatch):
    """The history file is compacted once it holds twice its limit; if that fails, the ledger says so once with a
    typed event (path, reason), which --json and the chat word; the history is kept as it is."""
    async def scenario():
        s = Setup(tmp_path)
        s.log.limit = 2
        monkeypatch.setattr(s.log, "compact", lambda: (_ for _ in ()).throw(rtchat.StateError("no room to compact")))
        alice = Link("alice")
        s.ledger.peer_verified(alice)
        for i in range(5):
            msg = said("alice", f"line {i}", sign=True)
            s.ledger.on_frame(alice, "chat", frame(msg, sig=msg.sig))
        assert await s.emitted.until(lambda: bool(s.seen("compaction-failed")), 5)
        more = said("alice", "and one more write", sign=True)
        s.ledger.on_frame(alice, "chat", frame(more, sig=more.sig))
        assert await s.ledger.written(5)
        (path, reason), = s.seen("compaction-failed")   # once, not with every write
        assert path == str(s.log.path) and reason == "no room to compact" and len(s.stored()) == 6
        record = rtchat.event_record(types.SimpleNamespace(name="ledger"), "compaction-failed", path, reason)
        assert (record["type"], record["path"], record["reason"]) == ("compaction-failed", path, reason)
        assert "no room to compact" in record["text"] and not s.seen("status")
        await s.ledger.close()
    run(scenario())
