"""Store: atomic, locked, merged writes; 0600; corrupt or newer files kept and reported."""
import json
import os
import stat
import subprocess
import sys

import pytest

import rtchat


def test_round_trip_and_permissions(tmp_path):
    path = tmp_path / "state.json"
    store = rtchat.Store(path)
    store.load()
    identity = store.identity()
    store.update(lambda d: d.update(name="alice"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = rtchat.Store(path)
    data = again.load()
    assert data["name"] == "alice"
    assert again.identity().fingerprint == identity.fingerprint
    assert data["identity"]["public_key"] == identity.public_key_string


def test_passphrase_protects_the_key(tmp_path):
    store = rtchat.Store(tmp_path / "s.json")
    store.load()
    fp = store.identity("secret").fingerprint
    assert "ENCRYPTED" in (tmp_path / "s.json").read_text()
    fresh = rtchat.Store(tmp_path / "s.json")
    fresh.load()
    with pytest.raises(rtchat.StateError, match="passphrase"):
        fresh.identity()
    assert fresh.identity("secret").fingerprint == fp


@pytest.mark.parametrize("content", ['{"format": 1, "name": ', "\x00\x01garbage", "[1, 2]", '{"name": "x"}'])
def test_corrupt_file_is_reported_and_left_alone(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(rtchat.StateError) as error:
        rtchat.Store(path).load()
    assert str(path) in str(error.value) and "untouched" in str(error.value)
    assert path.read_text() == content


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"format": rtchat.STATE_FORMAT + 1}))
    with pytest.raises(rtchat.StateError, match="newer"):
        rtchat.Store(path).load()


def test_deferred_writes_are_flushed(tmp_path):
    store = rtchat.Store(tmp_path / "s.json")
    store.load()
    store.defer(lambda d: d["rooms"].update(ops={}))
    assert "ops" in store.data["rooms"]
    store.flush()
    assert "ops" in rtchat.Store(tmp_path / "s.json").load()["rooms"]


WRITER = """
import sys; sys.path.insert(0, sys.argv[1])
import rtchat
store = rtchat.Store(sys.argv[2])
for i in range(int(sys.argv[4])):
    store.update(lambda d: d["rooms"].setdefault(sys.argv[3] + str(i), {}))
"""


def test_two_processes_merge_instead_of_clobbering(tmp_path):
    path = tmp_path / "shared.json"
    root = str(rtchat.Path(rtchat.__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, str(path), prefix, "40"]) for prefix in "ab"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    rooms = rtchat.Store(path).load()["rooms"]
    assert len(rooms) == 80


def test_instances_get_rtchat_style_suffixes(tmp_path):
    store = rtchat.Store(tmp_path / "s.json")
    store.load()
    first = rtchat.Client("alice", state=store.path, broker="mqtt://127.0.0.1:1")
    second = rtchat.Client("alice", state=store.path, broker="mqtt://127.0.0.1:1")
    for client in (first, second):
        client.store.load()
    assert first.store.update(first._claim_instance) == 0
    assert second.store.update(second._claim_instance) == 1
