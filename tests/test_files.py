"""File transfer between rtchat.py peers: a channel of its own, checked by SHA-256, saved without overwriting."""
import asyncio
import hashlib
import io
import json
import os

import pytest
from support import eventually, make_client, run

import rtchat


async def file_pair(tmp_path, broker_url, bob_files="inbox"):
    alice = await make_client("alice", tmp_path, broker_url).start()
    bob = await make_client("bob", tmp_path, broker_url, files=tmp_path / bob_files if bob_files else None).start()
    ra, rb = await alice.join("files"), await bob.join("files")
    await ra.wait_for_peers(1, 20)
    await rb.wait_for_peers(1, 20)
    await eventually(lambda: ra.peers["bob"].message_key, what="bob's hello")
    return alice, bob, ra, rb


def test_a_file_arrives_whole_and_checked(broker, tmp_path):
    async def scenario():
        alice, bob, ra, rb = await file_pair(tmp_path, broker.url)
        data = os.urandom(3 * 1024 * 1024 + 123)
        source = tmp_path / "report.bin"
        source.write_bytes(data)
        (tmp_path / "inbox").mkdir()
        (tmp_path / "inbox" / "report.bin").write_bytes(b"an older file of the same name")
        got = []
        rb.on("file", got.append)
        saved = await ra.send_file("bob", source)
        await eventually(lambda: got, what="the file event")
        received = got[0]
        assert saved == "report (1).bin" == received.path.name and received.sender == "alice"
        assert received.path.read_bytes() == data and received.size == len(data)
        assert received.sha256 == hashlib.sha256(data).hexdigest()
        assert received.fingerprint == alice.identity.fingerprint
        assert (tmp_path / "inbox" / "report.bin").read_bytes() == b"an older file of the same name"
        assert oct(received.path.stat().st_mode & 0o777) == "0o600"
        assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["report (1).bin", "report.bin"]
        # an empty file, and a hostile name
        empty = tmp_path / "..evil"
        empty.write_bytes(b"")
        assert await ra.send_file("bob", empty) == "evil"
        assert ra.send("still chatting") and await ra.flush(5)
        await alice.close()
        await bob.close()
    run(scenario())


def test_refusals_are_clear(broker, tmp_path):
    async def scenario():
        alice, bob, ra, rb = await file_pair(tmp_path, broker.url, bob_files=None)
        source = tmp_path / "a.txt"
        source.write_text("hello")
        with pytest.raises(rtchat.UsageError, match="does not take files"):
            await ra.send_file("bob", source)
        with pytest.raises(rtchat.UsageError, match="no peer"):
            await ra.send_file("nobody", source)
        with pytest.raises(rtchat.UsageError, match="is not a file"):
            await ra.send_file("bob", tmp_path / "missing.txt")
        await alice.close()
        await bob.close()
    run(scenario())


def test_a_corrupted_file_is_not_saved(broker, tmp_path):
    """A sender whose bytes do not match its header's SHA-256: refused, and no file or .part is left."""
    async def scenario():
        alice, bob, ra, rb = await file_pair(tmp_path, broker.url)
        reports, files = [], []
        rb.on("file-progress", lambda transfer: reports.append((transfer.state, transfer.error)))
        rb.on("file", files.append)
        channel = await ra.peers["bob"].open_channel("file/forged")
        replies = asyncio.Queue()
        channel.on("message", replies.put_nowait)
        channel.send(rtchat.to_json({"name": "x.bin", "size": 4, "sha256": "0" * 64}))
        assert rtchat.parse_json(await asyncio.wait_for(replies.get(), 5)) == {"ok": True}
        channel.send(b"abcd")
        verdict = rtchat.parse_json(await asyncio.wait_for(replies.get(), 5))
        assert verdict["ok"] is False and "SHA-256" in verdict["error"]
        await eventually(lambda: reports and reports[-1][0] == "failed", what="the failure report")
        assert reports[0] == ("offered", None) and "SHA-256" in reports[-1][1]
        assert not files and list((tmp_path / "inbox").iterdir()) == []
        # more bytes than announced, a wrong hash after the data, a bad trailer, and a header that is not one
        for header, payload, trailer in (({"name": "y", "size": 2, "sha256": "0" * 64}, b"abc", None),
                                         ({"name": "z", "size": 2}, b"ab", {"sha256": "0" * 64}),
                                         ({"name": "z", "size": 2}, b"ab", {"sha256": 5}),
                                         ("nonsense", None, None)):
            channel = await ra.peers["bob"].open_channel("file/" + rtchat.new_id())
            replies = asyncio.Queue()
            channel.on("message", replies.put_nowait)
            channel.send(rtchat.to_json(header))
            if payload:
                await asyncio.wait_for(replies.get(), 5)
                channel.send(payload)
            if trailer:
                channel.send(rtchat.to_json(trailer))
            verdict = rtchat.parse_json(await asyncio.wait_for(replies.get(), 5))
            assert verdict["ok"] is False, verdict
        # bob refuses and cleans up in one step, before his verdict leaves: nothing is left, every offer failed
        assert list((tmp_path / "inbox").iterdir()) == [] and not rb.files.receiving()
        states = [state for state, _ in reports]
        assert states.count("offered") == states.count("failed") == 4  # x.bin, y, z, z: "nonsense" is no offer
        await alice.close()
        await bob.close()
    run(scenario())


def test_a_received_file_is_shown_and_printed_as_json(broker, tmp_path):
    async def scenario():
        alice, bob, ra, rb = await file_pair(tmp_path, broker.url)
        out, err = io.StringIO(), io.StringIO()
        app = rtchat.App(bob, rtchat.Registry(), rtchat.Printer("json", False, out, err))
        await app.switch_room("files")
        source = tmp_path / "notes.txt"
        source.write_text("for bob\n")
        await ra.send_file("bob", source)
        await eventually(lambda: '"file"' in out.getvalue(), what="the json line")
        event = json.loads(out.getvalue().splitlines()[-1])
        assert event["type"] == "file" and event["from"] == "alice" and event["name"] == "notes.txt"
        assert event["size"] == 8 and event["sha256"] == hashlib.sha256(b"for bob\n").hexdigest()
        assert event["path"] == str(tmp_path / "inbox" / "notes.txt") and event["fingerprint"]
        await alice.close()
        await bob.close()
    run(scenario())
