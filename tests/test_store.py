"""Store: atomic, locked, merged writes; 0600; corrupt or newer files kept and reported."""
import json
import os
import stat
import subprocess
import sys
import time

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
    stored = json.loads((tmp_path / "s.json").read_text())["identity"]
    n, r, p = rtchat.KEY_SCRYPT
    assert all(stored[k].startswith(f"rtchat-key:scrypt:{n}:{r}:{p}:") for k in ("private_key", "message_key"))
    assert "PRIVATE KEY" not in (tmp_path / "s.json").read_text()
    fresh = rtchat.Store(tmp_path / "s.json")
    fresh.load()
    with pytest.raises(rtchat.StateError, match="passphrase"):
        fresh.identity()
    with pytest.raises(rtchat.StateError, match="wrong passphrase"):
        fresh.identity("not it")
    assert fresh.identity("secret").fingerprint == fp


def test_older_passphrase_keys_are_sealed_anew_with_scrypt(tmp_path):
    """Issue 12 item 11: PEM encryption (PBKDF2, 2,048 rounds: a guess costs under a millisecond) is replaced on
    the first start with the passphrase by rtchat.py's scrypt sealing; the key and its fingerprint stay."""
    from cryptography.hazmat.primitives import serialization

    identity = rtchat.Identity.generate()
    pbkdf2 = {k: key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"secret")).decode()
              for k, key in (("private_key", identity.private_key), ("message_key", identity.message_key))}
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": 1, "identity": {**pbkdf2, "public_key": identity.public_key_string,
                                                          "encrypted": True, "created": 1}}))

    def seconds_per_guess(text: str) -> float:
        started = time.perf_counter()
        with pytest.raises(rtchat.StateError):
            rtchat.Identity.from_pem(text, f"wrong guess {time.perf_counter()}")
        return time.perf_counter() - started
    before = min(seconds_per_guess(pbkdf2["private_key"]) for _ in range(3))
    store = rtchat.Store(path)
    store.load()
    assert store.identity("secret").fingerprint == identity.fingerprint
    sealed = json.loads(path.read_text())["identity"]
    assert sealed["private_key"].startswith("rtchat-key:scrypt:") and sealed["created"] == 1
    assert sealed["private_key"].split(":")[2:5] == [str(v) for v in rtchat.KEY_SCRYPT]
    after = min(seconds_per_guess(sealed["private_key"]) for _ in range(2))
    print(f"[issue 12] 11 passphrase: {before * 1000:.2f} ms per guess before (PBKDF2), {after * 1000:.0f} ms after "
          f"(scrypt n={rtchat.KEY_SCRYPT[0]}, r={rtchat.KEY_SCRYPT[1]}: {128 * rtchat.KEY_SCRYPT[0] * 8 >> 20} MiB)")
    again = rtchat.Store(path)
    again.load()
    assert again.identity("secret").fingerprint == identity.fingerprint
    assert json.loads(path.read_text())["identity"] == sealed   # sealed once, not at every start


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


def test_history_log_appends_compacts_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "h" / "room.jsonl"
    log = rtchat.HistoryLog(path, limit=5)
    log.append([{"id": f"m{i}", "text": f"line {i} ü"} for i in range(7)])
    log.append([{"id": "m3", "text": "a duplicate id is ignored"}])
    assert [e["id"] for e in log.entries()] == [f"m{i}" for i in range(7)]
    with path.open("ab") as f:
        f.write(b'{"id": "torn", "text": "cut by a cra')          # a crash in the middle of a line
    log.append([{"id": f"m{i}", "text": f"line {i} ü"} for i in range(7, 11)])
    assert not log.needs_compaction                              # append() compacted at 11 > 2 * 5
    fresh = rtchat.HistoryLog(path, limit=5)                     # what another process reads
    assert [e["id"] for e in fresh.entries()] == ["m6", "m7", "m8", "m9", "m10"]
    assert fresh.entries()[-1]["text"] == "line 10 ü"
    assert path.read_bytes().count(b"\n") == 5 and oct(path.stat().st_mode & 0o777) == "0o600"
    log.write([{"id": "m11", "text": "after compaction"}])
    log.sync()
    assert [e["id"] for e in rtchat.HistoryLog(path).entries()][-2:] == ["m10", "m11"]
