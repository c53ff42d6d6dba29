"""The public API a bot or plugin relies on: names and signatures are a contract."""
import inspect

import rtchat


def test_public_names():
    assert set(rtchat.__all__) == {
        "Client", "Room", "Peer", "Message", "Question", "ReceivedFile", "Context", "Session", "Plugins", "Store",
        "Identity", "PeerJSMesh", "PeerJSPlace", "MeshMember",
        "command", "question", "on", "EVENTS", "__version__", *ERRORS}
    for name in rtchat.__all__:
        assert hasattr(rtchat, name)


ERRORS = ("RtchatError", "UsageError", "BrokerUnreachable", "NoPeers", "StateError", "KeyMismatch", "AskError",
          "PeerServerUnreachable", "NameTaken", "PeerServerRefused", "PeerUnavailable")


def test_every_error_a_public_method_raises_is_exported_and_an_rtchat_error():
    raised = {name for name, value in vars(rtchat).items()
              if isinstance(value, type) and issubclass(value, rtchat.RtchatError)}
    assert raised == set(ERRORS)


def test_event_names():
    assert rtchat.EVENTS == ("message", "dm", "join", "leave", "verified", "key-changed", "delivered", "file",
                             "status", "history", "no-route", "file-progress", "question-failed", "key-accepted",
                             "key-refused", "disk-error", "disk-ok", "history-conflict", "compaction-failed",
                             "mitm-detected", "verify-failed", "queued", "relayed",
                             "relay-refused")  # names are only ever added


def test_signatures():
    assert list(inspect.signature(rtchat.Client).parameters) == [
        "name", "broker", "state", "ice", "ice_hosts", "trust", "passphrase", "files", "relay", "max_peers", "present"]
    assert list(inspect.signature(rtchat.Room.send).parameters) == ["self", "text", "action"]
    # sending never waits (it queues on the channel), so an event handler can reply at once
    assert not inspect.iscoroutinefunction(rtchat.Room.send) and not inspect.iscoroutinefunction(rtchat.Room.dm)
    assert list(inspect.signature(rtchat.Room.send_file).parameters) == ["self", "name", "path", "progress"]
    assert list(inspect.signature(rtchat.Room.wait_for_peer).parameters) == ["self", "name", "timeout"]
    assert list(inspect.signature(rtchat.Room.dm).parameters) == ["self", "name", "text"]
    assert list(inspect.signature(rtchat.Room.ask).parameters) == ["self", "name", "topic", "content", "timeout"]
    assert list(inspect.signature(rtchat.command).parameters) == ["name", "aliases", "help", "usage", "example",
                                                                  "not_on"]
    assert list(inspect.signature(rtchat.PeerJSPlace.send).parameters) == ["self", "text", "action"]
    assert list(inspect.signature(rtchat.PeerJSPlace.connect).parameters) == ["self", "name", "timeout"]
    assert list(inspect.signature(rtchat.Client.join_peerjs).parameters) == ["self", "server"]
    assert list(inspect.signature(rtchat.Plugins).parameters) == ["client", "folders", "may_send"]
    assert list(inspect.signature(rtchat.Context).parameters) == ["session", "origin", "room"]
    assert set(rtchat.Message.__dataclass_fields__) >= {"id", "room", "sender", "text", "ts", "kind"}


def test_the_session_commands_and_plugins_see():
    """What a built-in command or a plugin may ask of the front end it runs in (ctx.session), and nothing more."""
    public = {name for name in vars(rtchat.Session) if not name.startswith("_")}
    assert public == {"may_send", "rooms", "unread_count", "switch_room", "select_room", "part_room", "show", "echo",
                      "clear", "quit", "failed", "context", "answer_questions", "attach", "detach", "close"}
    assert issubclass(rtchat.Plugins, rtchat.Session) and issubclass(rtchat.App, rtchat.Session)


def test_decorators_only_tag():
    def f(ctx, args):
        return 42
    tagged = rtchat.command("x", help="h")(f)
    assert tagged is f and f(None, "") == 42
    assert f._rtchat_hooks == [("command", "x", {"aliases": (), "help": "h", "usage": "", "example": "",
                                                      "not_on": {}})]


def test_session_failures_are_typed_events_the_front_ends_word(tmp_path):
    """A man in the middle, or a peer that proves no key: the room emits fields, and only --json and the screen
    put them in words (issue 13, item 3)."""
    store = rtchat.Store(tmp_path / "state.json")
    store.load()
    me = rtchat.Identity.generate()
    room = rtchat.Room("ops", me="alice", identity=me, signaling=rtchat.Signaling("mqtt://127.0.0.1:1"),
                       trust=rtchat.Trust(store), store=store, ice=rtchat.ice_configuration([]), questions={})
    bob = rtchat.Peer("bob", room.ice, rtchat.RTCHAT_PY, client_tag=rtchat.CLIENT_TAG)
    mitm = rtchat.event_record(room, "mitm-detected", bob, me.fingerprint)
    assert (mitm["type"], mitm["from"], mitm["fingerprint"]) == ("mitm-detected", "bob", me.fingerprint)
    assert "someone is in the middle" in mitm["text"] and mitm["client"] == rtchat.CLIENT_TAG
    for reason in ("no-identity", "bad-identity", "challenge-failed"):
        failed = rtchat.event_record(room, "verify-failed", bob, reason)
        assert (failed["type"], failed["reason"]) == ("verify-failed", reason)
        assert failed["text"].endswith("disconnected") and failed["from"] == "bob"
