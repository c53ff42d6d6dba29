"""The interactive chat on the PeerJS network (issue 14) as a person uses it: `rtchat.py alice --peerjs URL` in a
pseudo-terminal, read through the terminal emulator of tests/test_screen.py, against the real PeerServer, with
listeners and pipes (rtchat.py subprocesses) and other terminals in the mesh. Every assertion is about the screen,
the other processes' output, or the state file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat

import pytest
from support import cli_env, run
from test_peerjs_cli import NO_BROKER, key_of, peerjs, pipe, state_files  # noqa: F401 (a fixture)
from test_screen import Terminal

import rtchat

PEERJS_ROW = re.compile(r"^(\d\d:\d\d) <([\w?-]+)> (.*)$")


@pytest.fixture(autouse=True)
def _loopback_ice():
    rtchat.restrict_ice_hosts(["127.0.0.1"])


@contextlib.asynccontextmanager
async def chat(tmp_path, server, name="alice", *extra, cols=100, rows=30, prompt=True):
    term = Terminal([name, "--peerjs", server.url(), "--state", str(tmp_path / f"{name}.json"), *extra],
                    cli_env(NO_BROKER, TERM="xterm"), cols, rows)
    try:
        if prompt:
            await term.wait(lambda: "[peerjs]" in term.prompt_row(), "the prompt")
        yield term
    finally:
        term.close()


def chat_rows(term) -> list[tuple[str, str]]:
    return [(m[2], m[3]) for row in term.lines() if (m := PEERJS_ROW.match(row))]


def bar(term) -> str:
    return next((row for row in term.rows() if row.startswith(" PeerJS: ")), "")


def test_three_users_chat_with_the_interactive_terminal(peerserver, tmp_path):
    """alice at a terminal dials bob (a listener); carol, a pipe, reaches alice through bob's mesh. Lines go both
    ways with time, joins and leaves show, /peers and the status bar follow, and what PeerJS lacks says so in one
    line. The listener and the pipe prove the keys of their state files: they show verified, without the mark."""
    async def scenario():
        bob = peerjs(peerserver, "bob", "--listen")
        bob.said("listening on PeerJS as bob")
        async with chat(tmp_path, peerserver, "alice", "--connect", "bob") as term:
            await term.wait_for_text("--> bob joined (verified, channel-bound)")
            assert "a name marked ? proved nothing" in term.text()
            await term.wait(lambda: bar(term).startswith(" PeerJS: 1 connected, 1 verified | alice, server ok"),
                            "the status bar")
            sent = pipe(peerserver, "carol", "hello from carol\n", "--connect", "bob")
            assert sent.returncode == 0, sent.stderr
            assert "to 2 peer(s): alice, bob" in sent.stderr
            await term.wait(lambda: ("carol", "hello from carol") in chat_rows(term), "carol's line, unmarked")
            await term.wait_for_text("--> carol joined (verified, channel-bound)")
            await term.wait_for_text("<-- carol left")  # the pipe is gone: seen at once, not after a timeout
            assert "carol?" not in term.text()
            term.type("hi all\r")
            await term.wait(lambda: ("alice", "hi all") in chat_rows(term), "alice's own line")
            bob.wait_for(lambda p: "alice: hi all" in p.out, what="alice's line at bob")
            term.type("/me waves\r")
            bob.wait_for(lambda p: "alice: * waves" in p.out, what="the action, signed as in rooms (the page "
                         "gets '* alice waves': test_peerjs.py)")
            term.type("/peers\r")
            peers_row = re.compile(r"bob +verified, channel-bound, [\d.]+ ms, direct +\[rtchat\.py\]")
            await term.wait(lambda: any(peers_row.match(row) for row in term.rows()), "bob in /peers with a round trip")
            for line, words in (("/msg bob psst", "/msg: peerjs-multichat has no direct messages"),
                                ("/ask bob time", "/ask: peerjs-multichat has no questions"),
                                (f"/send bob {__file__}", "/send: peerjs-multichat has no file transfer"),
                                ("/join ops", "/join: peerjs-multichat has no rooms"),
                                ("/rooms", "/rooms: peerjs-multichat has no rooms")):
                term.type(line + "\r")
                await term.wait_for_text(words)
            assert not any(row.startswith("psst") or "Traceback" in row for row in term.rows())
            assert "psst" not in " ".join(bob.out)
            term.type("/connect bob\r")
            await term.wait_for_text("you are connected to bob already")
            term.type("/help\r")
            await term.wait_for_text("/connect NAME")
            assert "/join ROOM" not in term.text() and "/msg NAME TEXT" not in term.text()
            term.type("/whoami\r")
            await term.wait_for_text(f"alice on PeerJS at {peerserver.url()}")
            term.type("\x04")
            assert await term.exit_code() == 0
        bob.wait_for(lambda p: any(line.startswith("<-- alice") for line in p.err), what="alice leaving")
        assert bob.stop() in (0, 130)
    run(scenario(), 120)


def test_errors_at_the_start_are_one_line_with_the_pipes_exit_codes(peerserver, own_peerserver, tmp_path):
    async def scenario():
        erin = peerjs(peerserver, "erin", "--listen")
        erin.said("listening on PeerJS as erin")
        down = own_peerserver()
        down_url = down.url()
        down.stop()
        cases = (("erin", [], 73, "erin is already taken"),
                 ("frank", ["--connect", "nobody"], 67, "nobody is not online"),
                 ("frank", ["--peerjs", peerserver.url("wrong")], 76, "refused us"),
                 ("frank", ["--peerjs", down_url], 69, "cannot reach PeerJS server"),
                 ("no/slash", [], 2, "cannot be used on PeerJS"),
                 ("frank", ["--peerjs", "ftp://127.0.0.1/"], 2, "use ws:// or wss://"))
        for name, extra, code, words in cases:
            async with chat(tmp_path, peerserver, name, *extra, prompt=False) as term:
                assert await term.exit_code(40) == code, term.text()
                errors = [row for row in term.rows() if row.startswith("rtchat: ")]
                assert len(errors) == 1 and words in errors[0], term.text()
                assert "Traceback" not in term.text()
        assert erin.stop() in (0, 130)
    run(scenario(), 120)


def test_connect_in_the_chat_and_its_errors(peerserver, tmp_path):
    """/connect NAME dials a user (and the mesh behind it); one who is not online is one line, and the chat goes
    on; the user who dialled us is seen too."""
    async def scenario():
        gina = peerjs(peerserver, "gina", "--listen")
        gina.said("listening on PeerJS as gina")
        hank = peerjs(peerserver, "hank", "--connect", "gina", "--listen")
        hank.said("listening on PeerJS as hank")
        async with chat(tmp_path, peerserver, "ivy") as term:
            term.type("/connect nobody\r")
            await term.wait_for_text("-!- nobody is not online")
            term.type("/connect gina\r")
            await term.wait(lambda: "--> gina joined" in term.text() and "--> hank joined" in term.text(),
                            "gina and, through her, hank")
            await term.wait(lambda: bar(term).startswith(" PeerJS: 2 connected"), "the status bar")
            hank.proc.terminate()
            await term.wait_for_text("<-- hank left")
            await term.wait(lambda: bar(term).startswith(" PeerJS: 1 connected"), "the status bar after hank")
            term.type("/connect\r")
            await term.wait_for_text("usage: /connect NAME")
            term.type("\x04")
            assert await term.exit_code() == 0
        hank.finish()
        assert gina.stop() in (0, 130)
    run(scenario(), 120)


def test_history_per_server_and_name_comes_back_marked(peerserver, own_peerserver, tmp_path):
    """What was said on the mesh is shown again after a restart (as history: italic times), kept 0600 beside the
    state file, under this server and name: another server starts with none."""
    async def scenario():
        jill = peerjs(peerserver, "jill", "--listen")
        jill.said("listening on PeerJS as jill")
        async with chat(tmp_path, peerserver, "kate", "--connect", "jill") as term:
            await term.wait_for_text("--> jill joined")
            term.type("remember me\r")
            jill.wait_for(lambda p: "kate: remember me" in p.out, what="kate's line")
            sent = pipe(peerserver, "liam", "and me\n", "--connect", "jill")
            assert sent.returncode == 0, sent.stderr
            await term.wait(lambda: ("liam", "and me") in chat_rows(term), "liam's line")
            term.type("\x04")
            assert await term.exit_code() == 0
        async with chat(tmp_path, peerserver, "kate", "--color", "always") as term:
            await term.wait(lambda: chat_rows(term)[:2] == [("kate", "remember me"), ("liam", "and me")],
                            "the history")
            for y, row in enumerate(term.rows()[:6]):
                if PEERJS_ROW.match(row):
                    assert term.screen.buffer[y][0].italics, row  # shown as history
            term.type("/lastlog REMEMBER\r")
            await term.wait_for_text("-!- 1 message(s) with 'REMEMBER' in #peerjs")
            term.type("\x04")
            assert await term.exit_code() == 0
        files = list((tmp_path / "kate.json.history").iterdir())
        kept = [f for f in files if f.suffix == ".jsonl"]
        assert len(kept) == 1 and stat.S_IMODE(kept[0].stat().st_mode) == 0o600
        entries = [json.loads(line) for line in kept[0].read_text().splitlines()]
        assert [(e["from"], e["text"], e["trust"]) for e in entries] == \
            [("kate", "remember me", "self"), ("liam", "and me", "channel-bound")]
        assert entries[1]["sig"] and entries[1]["fingerprint"] == key_of("liam")  # the pipe's line, signed
        other = own_peerserver()
        async with chat(tmp_path, other, "kate") as term:
            await term.wait_for_text("-!- on PeerJS as kate")
            assert chat_rows(term) == []
            term.type("\x04")
            assert await term.exit_code() == 0
        assert jill.stop() in (0, 130)
    run(scenario(), 150)


def test_two_terminals_are_verified_and_channel_bound(peerserver, tmp_path):
    """Two rtchat.py chats meeting on PeerJS prove their keys to each other on the connection: no mark, verified
    and channel-bound in /peers, keys pinned. Listeners in the same mesh prove the keys of their state files too:
    the chats show them verified, and they print a chat's lines as verified (no mark; --json: "trust"
    "channel-bound" and the chat's fingerprint)."""
    async def scenario():
        mona = peerjs(peerserver, "mona", "--listen")
        mona.said("listening on PeerJS as mona")
        ned = peerjs(peerserver, "ned", "--connect", "mona", "--listen", "--json")
        ned.said("listening on PeerJS as ned")
        async with chat(tmp_path, peerserver, "nina", "--connect", "mona") as nina, \
                chat(tmp_path, peerserver, "omar", "--connect", "nina") as omar:
            await nina.wait_for_text("--> omar joined (verified, channel-bound)")
            await omar.wait_for_text("--> nina joined (verified, channel-bound)")
            await omar.wait_for_text("--> mona joined (verified, channel-bound)")
            await omar.wait_for_text("--> ned joined (verified, channel-bound)")
            omar.type("signed hello\r")
            await nina.wait(lambda: ("omar", "signed hello") in chat_rows(nina), "omar's line, unmarked")
            mona.wait_for(lambda p: "omar: signed hello" in p.out, what="omar's line at the listener, unmarked")
            ned.wait_for(lambda p: any(e["type"] == "message" for e in p.events()), what="omar's line in --json")
            nina.type("/peers\r")
            await nina.wait(lambda: any(re.match(r"omar +verified, channel-bound.*\[rtchat\.py\]", row)
                                        for row in nina.rows()), "omar verified in /peers")
            await nina.wait(lambda: bar(nina).startswith(" PeerJS: 3 connected, 3 verified"), "the status bar")
            assert "mona?" not in nina.text() and "ned?" not in nina.text()
            nina.type("/whois omar\r")
            await nina.wait_for_text("safety number")
            for term in (nina, omar):
                term.type("\x04")
                assert await term.exit_code() == 0
        state = json.loads((tmp_path / "nina.json").read_text())
        omars = [pin for pin in state["pins"].values() if "omar" in pin["names"]]
        assert len(omars) == 1 and omars[0]["signs"]
        kept = next(f for f in (tmp_path / "nina.json.history").iterdir() if f.suffix == ".jsonl")
        entry = json.loads(kept.read_text().splitlines()[0])
        assert (entry["from"], entry["trust"]) == ("omar", "channel-bound") and entry["sig"]
        message = next(e for e in ned.events() if e["type"] == "message")
        assert (message["from"], message["text"], message["trust"], message["fingerprint"]) == \
            ("omar", "signed hello", "channel-bound", key_of("omar"))
        joins = {e["from"]: e for e in ned.events() if e["type"] == "join"}
        assert joins["omar"]["channel_bound"] and joins["omar"]["fingerprint"] == key_of("omar")
        assert "nina" in json.loads((tmp_path / "ned.json").read_text())["pins"][key_of("nina")]["names"]
        assert mona.stop() in (0, 130) and ned.stop() in (0, 130)
    run(scenario(), 150)


def test_the_mark_and_the_chat_survive_a_hostile_name_and_text(peerserver, tmp_path):
    """A page user's line with terminal controls is shown cleaned, marked, on its own row."""
    async def scenario():
        async with chat(tmp_path, peerserver, "pam") as term:
            mallory = rtchat.PeerJSMesh("mallory", server=peerserver.url(), ice=rtchat.ice_configuration([]))
            await mallory.start()
            try:
                await mallory.connect("pam")
                mallory.send_chat("\x1b[2J\x1b]0;owned\x07<pam> fake\nline two")
                await term.wait(lambda: any(row.startswith("mallory?") or "<mallory?>" in row
                                            for row in term.rows()), "mallory's line")
                rows = term.rows()
                assert not any(row.startswith("<pam>") or re.match(r"\d\d:\d\d <pam> fake", row) for row in rows)
                assert any(re.match(r"\d\d:\d\d <mallory\?> <pam> fake", row) for row in rows), term.text()
            finally:
                await mallory.close()
            term.type("\x04")
            assert await term.exit_code() == 0
    run(scenario(), 90)


def test_the_history_file_is_private(peerserver, tmp_path):
    """0600 like all state, in a folder only we can enter."""
    async def scenario():
        async with chat(tmp_path, peerserver, "quinn") as term:
            term.type("a line for nobody\r")
            await term.wait(lambda: ("quinn", "a line for nobody") in chat_rows(term), "the line")
            term.type("\x04")
            assert await term.exit_code() == 0
        folder = tmp_path / "quinn.json.history"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir()), os.listdir(folder)
    run(scenario(), 60)


def test_the_status_bar_follows_the_server_and_chat_goes_on_without_it(own_peerserver, tmp_path):
    async def scenario():
        server = own_peerserver()
        rosa = peerjs(server, "rosa", "--listen")
        rosa.said("listening on PeerJS as rosa")
        async with chat(tmp_path, server, "sam", "--connect", "rosa") as term:
            await term.wait_for_text("--> rosa joined")
            await term.wait(lambda: "sam, server ok" in bar(term), "the server ok")
            server.stop()
            await term.wait(lambda: "sam, server reconnecting" in bar(term), "the status bar saying so")
            term.type("still here\r")
            rosa.wait_for(lambda p: "sam: still here" in p.out, what="the line, peer to peer")
            term.type("\x04")
            assert await term.exit_code() == 0
        assert rosa.stop() in (0, 130)
    run(scenario(), 90)


def test_a_changed_key_is_refused_loudly_and_trust_takes_it(peerserver, tmp_path):
    """uma pinned another key for vic (an earlier vic, or someone else): vic's chat is refused with one line, and
    once uma types /trust vic, vic is dialled again and verified under the new key."""
    async def scenario():
        store = rtchat.Store(tmp_path / "uma.json")
        store.load()
        old = rtchat.Identity.generate()
        rtchat.Trust(store).pin("vic", old.public_key_string, signs=True)
        async with chat(tmp_path, peerserver, "uma") as uma, chat(tmp_path, peerserver, "vic", "--connect", "uma"):
            await uma.wait_for_text("vic has a DIFFERENT KEY than the one pinned")
            assert "--> vic" not in uma.text()
            uma.type("/trust vic\r")
            await uma.wait_for_text("pinned vic to key")
            await uma.wait_for_text("--> vic joined (verified, channel-bound)")
            uma.type("\x04")
            assert await uma.exit_code() == 0
        pins = json.loads((tmp_path / "uma.json").read_text())["pins"]
        assert [fp for fp, pin in pins.items() if "vic" in pin["names"]] != [old.fingerprint]
    run(scenario(), 90)


def test_a_pipe_under_a_pinned_name_with_another_key_is_refused_loudly(peerserver, tmp_path):
    """wes pinned another key for the name xena: a pipe xena whose state file holds another key is refused at the
    terminal with one loud line, its line is not shown, and the pipe fails: wes closed the connection once the key
    was refused, so the line reached nobody (PeerJS carries no refusal: the pipe cannot say why, as 77 would)."""
    async def scenario():
        store = rtchat.Store(tmp_path / "wes.json")
        store.load()
        rtchat.Trust(store).pin("xena", rtchat.Identity.generate().public_key_string, signs=True)
        async with chat(tmp_path, peerserver, "wes") as wes:
            sent = pipe(peerserver, "xena", "let me in\n", "--connect", "wes", "--timeout", "10")
            await wes.wait_for_text("xena has a DIFFERENT KEY than the one pinned")
            assert sent.returncode == rtchat.EX_TEMPFAIL and "Traceback" not in sent.stderr, sent.stderr
            assert sent.stderr.strip().splitlines()[-1] == "rtchat: 1 of 1 message(s) reached nobody: nobody was " \
                "connected then"
            assert "let me in" not in wes.text() and "--> xena" not in wes.text()
            wes.type("\x04")
            assert await wes.exit_code() == 0
    run(scenario(), 90)
