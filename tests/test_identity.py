"""Identity: RSA-PSS exactly as WebCrypto does it, JWK text as browsers send it, keys at rest."""
import json
from pathlib import Path

import pytest

import rtchat

BROWSER = json.loads((Path(__file__).parent / "data" / "webcrypto_signature.json").read_text())


@pytest.fixture(scope="module")
def identity():
    return rtchat.Identity.generate()


def test_browser_signature_verifies():
    """A signature made by Chromium's WebCrypto over a latin-1 challenge (rtchat-wire.md §6.3)."""
    assert rtchat.verify_signature(BROWSER["publicKeyString"], BROWSER["signature"].encode("latin-1"),
                                   BROWSER["challenge"].encode("latin-1"))
    assert not rtchat.verify_signature(BROWSER["publicKeyString"], BROWSER["signature"].encode("latin-1"),
                                       b"another challenge")


def test_jwk_text_is_byte_identical_to_the_browsers():
    key = rtchat.load_public_key(BROWSER["publicKeyString"])
    assert rtchat.jwk_text(key) == BROWSER["publicKeyString"]


def test_own_key_in_browser_form(identity):
    jwk = json.loads(identity.public_key_string)
    assert list(jwk) == ["alg", "e", "ext", "key_ops", "kty", "n"]
    assert jwk["alg"] == "PS256" and jwk["kty"] == "RSA" and jwk["key_ops"] == ["verify"]
    assert rtchat.verify_signature(identity.public_key_string, identity.sign(b"challenge"), b"challenge")


@pytest.mark.parametrize("bad", ["", "{}", "[]", '{"kty":"RSA","n":"AQAB","e":"AQAB"}', "x" * 5000,
                                 '{"kty":"EC","n":"a","e":"b"}'])
def test_bad_keys_are_refused(bad):
    with pytest.raises(ValueError):
        rtchat.load_public_key(bad)
    assert not rtchat.verify_signature(bad, b"x" * 256, b"data")


def test_fingerprint_and_safety_number(identity):
    other = BROWSER["publicKeyString"]
    fp_a, fp_b = identity.fingerprint, rtchat.fingerprint(other)
    assert len(fp_a) == 64 and fp_a != fp_b
    number = rtchat.safety_number(fp_a, fp_b)
    assert number == rtchat.safety_number(fp_b, fp_a)
    assert len(number.replace(" ", "")) == 20


def test_private_key_encrypted_at_rest(identity):
    pem = identity.to_pem("correct horse")
    assert pem.startswith(rtchat.SEALED_KEY_PREFIX) and "PRIVATE KEY" not in pem
    assert rtchat.Identity.from_pem(pem, "correct horse").fingerprint == identity.fingerprint
    with pytest.raises(rtchat.StateError, match="passphrase"):
        rtchat.Identity.from_pem(pem, None)
    with pytest.raises(rtchat.StateError, match="wrong passphrase"):
        rtchat.Identity.from_pem(pem, "wrong")
