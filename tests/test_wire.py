"""Wire: lz-string against vectors made by the real JS library, envelopes, names, sanitizing."""
import json
from pathlib import Path

import pytest

import rtchat

DATA = Path(__file__).parent / "data"
VECTORS = json.loads((DATA / "lzstring_vectors.json").read_text())
JUNK = json.loads((DATA / "lzstring_junk.json").read_text())


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: f"{len(c['input'])}chars")
def test_lz_compress_matches_js_byte_for_byte(case):
    assert rtchat.lz_compress(case["input"]).hex() == case["hex"]


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: f"{len(c['input'])}chars")
def test_lz_decompress_reads_js_output(case):
    expected = case["input"] if case["input"] else None  # JS gives "" for "", which carries no envelope
    assert rtchat.lz_decompress(bytes.fromhex(case["hex"]), max_chars=10**6) == expected


def test_spec_vectors_from_rtchat_wire_md():
    envelope = '{"sender":"Alice","timestamp":1764100000000,"subtopic":"connect","data":{}}'
    assert rtchat.lz_compress(envelope).hex() == (
        "378220ce0a6076026104e20170808201b025818c2200d0800ba602d84611021a9003b202300ec01b002c0c00cdcfde1600"
        "5700464403dad1cc84365150a046c440881855ab260017d3500000")


@pytest.mark.parametrize("case", JUNK, ids=lambda c: c["description"][:40])
def test_lz_junk_never_raises_and_never_yields_what_js_rejects(case):
    result = rtchat.lz_decompress(bytes.fromhex(case["junk_hex"]))
    if case["kind"] in ("null", "throws") or case["result"] in ("", None):
        assert result is None
    else:
        assert result == case["result"]


def test_decompression_is_capped():
    bomb = rtchat.lz_compress("a" * 200_000)
    assert len(bomb) < 2000
    assert rtchat.lz_decompress(bomb, max_chars=100_000) is None
    assert rtchat.decode_envelope(rtchat.lz_compress('{"sender":"x","timestamp":1,"subtopic":"s","data":"'
                                                     + "a" * 300_000 + '"}')) is None


def test_envelope_both_dialects():
    env = {"sender": "Zoë 🎲", "timestamp": 1764100000000, "subtopic": "connect", "data": {"a": [1, 2]}}
    assert rtchat.decode_envelope(rtchat.encode_envelope(env)) == env
    assert rtchat.decode_envelope(json.dumps(env).encode()) == env


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\xff\xfe" * 10, b"[]", b'"x"', b"{}", b'{"sender":"","timestamp":1,"subtopic":"x"}',
    b'{"sender":"a","timestamp":"1","subtopic":"x"}', b'{"sender":"a","timestamp":true,"subtopic":"x"}',
    b'{"sender":5,"timestamp":1,"subtopic":"x"}', b"[" * 100_000, b"\x80" * 1001, b"x" * (64 * 1024 + 2),
    b'{"sender":"a","timestamp":NaN,"subtopic":"x"}', b'{"sender":"a","timestamp":Infinity,"subtopic":"x"}',
    b'{"sender":"a\\u001b[31m","timestamp":1,"subtopic":"x"}',
])
def test_malformed_payloads_are_dropped(payload):
    assert rtchat.decode_envelope(payload) is None


def test_deeply_nested_json_is_dropped_not_raised():
    deep = rtchat.lz_compress('{"sender":"a","timestamp":1,"subtopic":"x","data":' + "[" * 50_000 + "]" * 50_000 + "}")
    assert rtchat.decode_envelope(deep) is None


def test_collation_follows_js_locale_compare():
    # Examples from rtchat-wire.md §4.4: not code-point order.
    key = rtchat.collation_key
    assert key("alice") < key("Bob")
    assert key("bob") < key("Bob")
    assert key("Zoë") < key("Zof")
    assert key("Bob") < key("Bob(py)")


def test_clean_makes_peer_strings_inert():
    evil = "hi\x1b[2J\x1b]0;pwned\x07\x1b[31mred\x07\x00\u202eevil\r\nnext"
    cleaned = rtchat.clean(evil)
    assert "\x1b" not in cleaned and "\x07" not in cleaned and "\u202e" not in cleaned and "\n" not in cleaned
    assert "hi" in cleaned and "red" in cleaned
    assert rtchat.clean("a\nb", keep_newlines=True) == "a\nb"
    assert len(rtchat.clean("x" * 100_000)) == rtchat.MAX_TEXT_CHARS


@pytest.mark.parametrize("room", ["a+b", "a#b", "", "x\x00", "a\nb"])
def test_bad_rooms_are_refused(room):
    with pytest.raises(rtchat.UsageError):
        rtchat.check_room_name(room)


def test_room_accepts_irc_style():
    assert rtchat.check_room_name("#ops") == "ops"
    assert rtchat.topic_for("ops") == "mrtchat/ops"


@pytest.mark.parametrize("name", ["", "a(1)", "a|b", "anonymous", "User #5", "x\x1b[31m", "n" * 65])
def test_bad_names_are_refused(name):
    with pytest.raises(rtchat.UsageError):
        rtchat.check_display_name(name)


def test_bare_name():
    assert rtchat.bare_name("alice(2)") == "alice"
    assert rtchat.bare_name(" bob |x") == "bob"


def test_sdp_fields():
    sdp = "v=0\r\na=ice-ufrag:abcd\r\na=fingerprint:sha-256 aa:bb\r\na=fingerprint:sha-384 cc\r\n"
    assert rtchat.sdp_field(sdp, "ice-ufrag") == "abcd"
    assert rtchat.sdp_fingerprint(sdp) == "AA:BB"


def test_timestamps_a_terminal_cannot_show_are_refused():
    assert rtchat.valid_ts(rtchat.now_ms())
    for bad in (10**23, -1, 1.5, True, "1", None, float("nan")):
        assert not rtchat.valid_ts(bad)
    stored = rtchat.Message.from_dict({"id": "x", "from": "bob", "text": "t", "ts": 10**23})
    assert stored.ts == 0  # an old history entry with a bad time still shows
