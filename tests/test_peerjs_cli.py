"""Pipes and listeners on the PeerJS network (issue 14): `rtchat.py NAME --peerjs URL [--connect NAME]`, run as
subprocesses against a real PeerServer (the `peerserver` fixture), several at once. The broker they are given is
one nobody listens on: with --peerjs alone no MQTT connection is attempted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest
from support import Proc, cli_env, rtchat_cmd

import rtchat

NO_BROKER = "mqtt://127.0.0.1:9"   # nothing listens there: any attempt to use it would fail the run
STATES: list[Path] = []            # the folder of the running test, where each name keeps its state file


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])


@pytest.fixture(autouse=True)
def state_files(tmp_path):
    """Each rtchat.py a test starts keeps its key and pins in NAME.json in the test's own folder (as the chat's
    --state in test_peerjs_chat.py)."""
    STATES[:] = [tmp_path]


def state_env(name: str, **extra: str) -> dict:
    return cli_env(NO_BROKER, RTCHAT_STATE=str(STATES[0] / f"{name}.json"), **extra)


def key_of(name: str) -> str:
    """The fingerprint of the key in NAME's state file."""
    return rtchat.fingerprint(json.loads((STATES[0] / f"{name}.json").read_text())["identity"]["public_key"])


def peerjs(server, name: str, *args: str, stdin=subprocess.DEVNULL) -> Proc:
    return Proc([name, "--peerjs", server.url(), *args], state_env(name), stdin=stdin)


def pipe(server, name: str, text: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(rtchat_cmd(name, "--peerjs", server.url(), *args), input=text, env=state_env(name),
                          capture_output=True, text=True, timeout=60)


def test_a_pipe_reaches_the_whole_mesh_through_one_user(peerserver):
    """ci dials bob only; carol is in bob's mesh: both get the line, ci exits 0 with nothing on stdout."""
    bob = peerjs(peerserver, "bob", "--listen", "--count", "1")
    bob.said("listening on PeerJS as bob")
    carol = peerjs(peerserver, "carol", "--connect", "bob", "--listen", "--json", "--count", "1")
    carol.said("listening on PeerJS as carol")
    sent = pipe(peerserver, "ci", "deployed\n\n", "--connect", "bob")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == ""
    assert "delivered 1 message(s) to 2 peer(s): bob, carol" in sent.stderr
    assert bob.finish() == 0 and carol.finish() == 0
    assert bob.out == ["ci: deployed"]
    assert any(line.startswith("--> carol") for line in bob.err)  # a plain listener's joins go to stderr
    events = carol.events()
    assert [(e["type"], e["from"]) for e in events if e["type"] == "join"][:1] == [("join", "bob")]
    joined = next(e for e in events if e["type"] == "join")
    assert joined["room"] == "peerjs" and joined["network"] == "peerjs"
    assert joined["text"] == "joined (verified, channel-bound)" and joined["channel_bound"]  # keys on both ends
    message = next(e for e in events if e["type"] == "message")
    assert (message["from"], message["text"], message["trust"], message["room"], message["network"]) == \
        ("ci", "deployed", "channel-bound", "peerjs", "peerjs")
    assert message["fingerprint"] == key_of("ci")


def test_a_pipe_without_connect_waits_to_be_dialled(peerserver):
    sender = peerjs(peerserver, "ci2", "--wait-peers", "1", "--timeout", "30", stdin=subprocess.PIPE)
    sender.proc.stdin.write("ready\n")
    sender.proc.stdin.close()
    sender.said("waiting for 1 user(s) to connect to ci2")
    listener = peerjs(peerserver, "dave", "--connect", "ci2", "--listen", "--count", "1")
    assert listener.finish() == 0 and listener.out == ["ci2: ready"]
    assert sender.finish() == 0, sender.err
    assert any("delivered 1 message(s) to 1 peer(s): dave" in line for line in sender.err)


def test_unknown_user_and_taken_name_are_one_line_each_with_their_codes(peerserver):
    nobody = pipe(peerserver, "ci3", "x\n", "--connect", "nobody")
    assert nobody.returncode == rtchat.EX_NOUSER
    assert nobody.stderr.strip().splitlines() == ["rtchat: nobody is not online"]
    erin = peerjs(peerserver, "erin", "--listen")
    erin.said("listening on PeerJS as erin")
    again = pipe(peerserver, "erin", "x\n", "--connect", "nobody")
    assert again.returncode == rtchat.EX_CANTCREAT, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "erin" in again.stderr
    assert erin.stop(signal.SIGINT) == 130


def test_a_hostile_line_is_shown_cleaned_and_kept_exact_in_json(peerserver):
    """A mesh member sends terminal controls: the plain listener shows them cleaned; --json carries the text
    cleaned too (every string from a peer), and nothing reaches the terminal raw."""
    plain = peerjs(peerserver, "frank", "--listen", "--count", "1")
    plain.said("listening on PeerJS as frank")

    async def speak() -> None:
        mallory = rtchat.PeerJSMesh("mallory", server=peerserver.url(), ice=rtchat.ice_configuration([]))
        await mallory.start()
        try:
            await mallory.connect("frank")
            mallory.send_chat("\x1b]0;owned\x07\x1b[2Jhello\x1b[31m")
            assert await mallory.flush(10)
        finally:
            await mallory.close()
    asyncio.run(asyncio.wait_for(speak(), 60))
    assert plain.finish() == 0
    assert plain.out == ["mallory: hello"]
    assert not any("\x1b" in line for line in plain.out + plain.err)


def test_usage_errors_are_one_line(peerserver):
    env = cli_env(NO_BROKER)
    for args, words in ((["x", "--connect", "bob"], "add --peerjs"), (["x", "--bogus"], "unrecognized arguments"),
                        (["x", "--peerjs", peerserver.url(), "--send", __file__, "--to", "bob"], "no file transfer"),
                        (["x", "--peerjs", peerserver.url(), "--listen", "--history", "3"], "no history"),
                        (["x", "--peerjs", peerserver.url(), "--room", "ops"], "--room does not apply"),
                        (["bad/name", "--peerjs", peerserver.url(), "--listen"], "cannot be used on PeerJS")):
        done = subprocess.run(rtchat_cmd(*args), env=env, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, not argparse's usage first


def test_listener_json_lines_are_objects_and_leaves_are_seen(peerserver):
    gina = peerjs(peerserver, "gina", "--listen", "--json")
    gina.said("listening on PeerJS as gina")
    hank = peerjs(peerserver, "hank", "--connect", "gina", "--listen")
    hank.said("listening on PeerJS as hank")
    gina.wait_for(lambda p: any(json.loads(line)["type"] == "join" for line in p.out), what="hank joining")
    assert hank.stop(signal.SIGTERM) == 130
    hank.finish()
    assert not any("<-- gina" in line for line in hank.err)  # we left: nobody else did
    gina.wait_for(lambda p: any(json.loads(line)["type"] == "leave" for line in p.out), what="hank leaving")
    leave = next(e for e in gina.events() if e["type"] == "leave")
    assert leave["from"] == "hank" and leave["reason"] and leave["text"] != "left (left)"
    assert gina.stop(signal.SIGINT) == 130


def test_a_member_that_stops_answering_is_named_and_nothing_breaks(peerserver):
    """carol is in bob's mesh but frozen (SIGSTOP): a pipe through bob reaches bob, then exits 75 naming carol,
    in one line; dialling frozen carol directly is 75 too (she is on the server, not answering), not 67."""
    bob = peerjs(peerserver, "bob2", "--listen", "--count", "1")
    bob.said("listening on PeerJS as bob2")
    carol = peerjs(peerserver, "carol2", "--connect", "bob2", "--listen")
    carol.said("listening on PeerJS as carol2")
    carol.proc.send_signal(signal.SIGSTOP)
    try:
        sent = pipe(peerserver, "ci4", "to everyone\n", "--connect", "bob2", "--timeout", "5")
        assert sent.returncode == 75, sent.stderr
        assert "Traceback" not in sent.stderr
        assert sent.stderr.strip().splitlines()[-1] == \
            "rtchat: not delivered to carol2: in the mesh, but not connected within 5 s"
        assert bob.finish() == 0 and bob.out == ["ci4: to everyone"]
        direct = pipe(peerserver, "ci5", "x\n", "--connect", "carol2", "--timeout", "3")
        assert direct.returncode == 75 and "Traceback" not in direct.stderr
        assert direct.stderr.strip().splitlines() == ["rtchat: carol2 is on the server but did not connect within 3 s"]
    finally:
        carol.proc.send_signal(signal.SIGCONT)
        carol.stop()


def test_settings_from_the_environment_for_the_other_network_are_no_usage_errors(peerserver, broker):
    """RTCHAT_SECRET and RTCHAT_ROOM in the environment do not stop --peerjs; an empty RTCHAT_PEERJS is unset."""
    env = state_env("ivy", RTCHAT_SECRET="for the rooms", RTCHAT_ROOM="ops")
    listener = Proc(["ivy", "--peerjs", peerserver.url(), "--listen"], env)
    listener.said("listening on PeerJS as ivy")
    assert listener.stop(signal.SIGINT) == 130
    mqtt = Proc(["ivy", "--room", "ops", "--listen"],
                cli_env(broker.url, RTCHAT_PEERJS="", RTCHAT_STATE=env["RTCHAT_STATE"]))
    mqtt.said("listening in #ops")
    assert mqtt.stop(signal.SIGINT) == 130


def test_lines_that_reach_nobody_are_not_delivered(peerserver):
    """A pipe whose mesh is empty when a line comes (--wait-peers 0, or everyone left meanwhile): the network
    passes nothing on later, so that line is lost and the pipe says so (75), not "delivered"."""
    async def scenario():
        args = argparse.Namespace(connect=[], wait_peers=0, timeout=5.0)
        mesh = await rtchat.PeerJSMesh("lonely", server=peerserver.url(), ice=rtchat.ice_configuration([])).start()
        queue: asyncio.Queue = asyncio.Queue()
        for line in ("into the void", None):
            queue.put_nowait(line)
        try:
            with pytest.raises(rtchat.NoPeers, match="1 of 1 message"):
                await rtchat._peerjs_pipe(mesh, args, rtchat.Printer("quiet", False), queue)
        finally:
            await mesh.close()
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_state_file_is_read_as_for_rooms_before_the_server_is_reached(peerserver):
    """Pipes and listeners on PeerJS load the state file's key as in rooms: a damaged file or a key under a
    passphrase not given is the rooms' one line and exit code, before any log-in; with the passphrase (here
    RTCHAT_PASSPHRASE) the key is opened and proven (the listener sees the pipe verified)."""
    (STATES[0] / "yan.json").write_text("{not json")
    store = rtchat.Store(STATES[0] / "zoe.json")
    store.load()
    sealed = store.identity("open sesame")
    for name, words in (("yan", "is damaged"), ("zoe", "the identity key is encrypted: give its passphrase")):
        for args in (["--listen"], ["--connect", "nobody"]):
            done = subprocess.run(rtchat_cmd(name, "--peerjs", peerserver.url(), *args), input="x\n",
                                  env=state_env(name), capture_output=True, text=True, timeout=60)
            assert done.returncode == rtchat.EX_CONFIG, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not any(e.get("id") in ("secure-p2p-multichat-yan", "secure-p2p-multichat-zoe") for e in peerserver.events)
    listener = peerjs(peerserver, "abe", "--listen", "--json", "--count", "1")
    listener.said("listening on PeerJS as abe")
    sent = subprocess.run(rtchat_cmd("zoe", "--peerjs", peerserver.url(), "--connect", "abe"), input="sealed\n",
                          env=state_env("zoe", RTCHAT_PASSPHRASE="open sesame"), capture_output=True, text=True,
                          timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert listener.finish() == 0
    message = next(e for e in listener.events() if e["type"] == "message")
    assert (message["from"], message["trust"], message["fingerprint"]) == ("zoe", "channel-bound", sealed.fingerprint)


def test_a_listener_refuses_a_changed_key_and_says_so_in_its_json(peerserver):
    """bea's state file pins another key for cal: the pipe cal is refused, bea's --json says key-changed (with
    "network"), cal's line is not printed, and the pipe exits 75 (its line reached nobody)."""
    store = rtchat.Store(STATES[0] / "bea.json")
    store.load()
    rtchat.Trust(store).pin("cal", rtchat.Identity.generate().public_key_string, signs=True)
    bea = peerjs(peerserver, "bea", "--listen", "--json")
    bea.said("listening on PeerJS as bea")
    sent = pipe(peerserver, "cal", "impostor?\n", "--connect", "bea", "--timeout", "10")
    assert sent.returncode == rtchat.EX_TEMPFAIL and "Traceback" not in sent.stderr, sent.stderr
    bea.wait_for(lambda p: any(e["type"] == "key-changed" for e in p.events()), what="the refusal")
    refused = next(e for e in bea.events() if e["type"] == "key-changed")
    assert (refused["from"], refused["verdict"], refused["fingerprint"], refused["network"]) == \
        ("cal", "changed", key_of("cal"), "peerjs")
    assert bea.stop(signal.SIGINT) == 130
    assert not any(e["type"] in ("message", "join") for e in bea.events())
