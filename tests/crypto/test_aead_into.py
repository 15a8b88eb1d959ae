"""``AeadKey.seal_into`` / ``open_into``: the AEAD writing into the caller's buffer.

They must compute exactly what ``seal`` / ``open`` compute (Wycheproof's AES-256-GCM cases, and
both ciphers against the bytes-returning calls), keep ``open``'s single ``DecryptionFailed`` for
every bad ciphertext, leave no unauthenticated plaintext behind when opening fails, refuse an
output buffer of the wrong size with a ``CryptoError`` that does not blame the peer, and never
write to their inputs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from qflare import crypto
from qflare.crypto import AeadKey
from qflare.errors import CryptoError, DecryptionFailed, QflareError

from .vectors import h, params

CIPHERS = ("AES-256-GCM", "ChaCha20-Poly1305")
TAG = 16
NONCE = bytes(range(12))
AAD = b"record header"
# Empty, shorter than a block, a few blocks, not a multiple of the block, and large.
SIZES = (0, 1, 15, 16, 17, 1000, 4096, 65_537, 1 << 20)


def _key(name: str) -> AeadKey:
    return crypto.aead(name).key(bytes(range(32)))


def _sealed(key: AeadKey, plaintext: bytes) -> bytes:
    return key.seal(NONCE, plaintext, AAD)


@pytest.mark.parametrize("name", CIPHERS)
@pytest.mark.parametrize("size", SIZES)
def test_seal_into_writes_what_seal_returns(name: str, size: int) -> None:
    key = _key(name)
    plaintext = os.urandom(size)
    out = bytearray(size + TAG)
    assert key.seal_into(NONCE, plaintext, AAD, out) == size + TAG
    assert bytes(out) == _sealed(key, plaintext)


@pytest.mark.parametrize("name", CIPHERS)
@pytest.mark.parametrize("size", SIZES)
def test_open_into_writes_what_open_returns(name: str, size: int) -> None:
    key = _key(name)
    plaintext = os.urandom(size)
    out = bytearray(b"\xaa" * size)
    assert key.open_into(NONCE, _sealed(key, plaintext), AAD, out) == size
    assert bytes(out) == plaintext == key.open(NONCE, _sealed(key, plaintext), AAD)


@pytest.mark.parametrize("name", CIPHERS)
def test_into_a_view_of_a_bigger_frame(name: str) -> None:
    """The use they exist for: the AEAD output written behind a header, in one buffer, and
    read back through views; the bytes around the window are left alone."""
    key = _key(name)
    plaintext = os.urandom(3000)
    frame = bytearray(b"H" * 35 + bytes(len(plaintext) + TAG) + b"T" * 7)
    with memoryview(frame) as view, view[35:-7] as window:
        key.seal_into(NONCE, plaintext, view[:35], window)
    assert frame[:35] == b"H" * 35 and frame[-7:] == b"T" * 7
    assert frame[35:-7] == key.seal(NONCE, plaintext, b"H" * 35)
    got = bytearray(len(plaintext))
    with memoryview(frame) as view, view[35:-7] as body, memoryview(got) as out:
        key.open_into(NONCE, body, view[:35], out)
    assert got == plaintext
    frame.append(0)  # every view released: the bytearray can be resized again


@pytest.mark.parametrize("name", CIPHERS)
def test_inputs_are_only_read(name: str) -> None:
    key = _key(name)
    plaintext = bytearray(os.urandom(70_000))
    aad = bytearray(AAD)
    before = bytes(plaintext)
    out = bytearray(len(plaintext) + TAG)
    key.seal_into(NONCE, plaintext, aad, out)
    assert plaintext == before and aad == AAD
    sealed = bytes(out)
    ciphertext = bytearray(sealed)
    key.open_into(NONCE, ciphertext, aad, bytearray(len(plaintext)))
    assert ciphertext == sealed and aad == AAD
    # A bad tag fails without writing to the ciphertext either.
    ciphertext[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        key.open_into(NONCE, ciphertext, aad, bytearray(len(plaintext)))
    assert ciphertext[:-1] == sealed[:-1]


def _bad_opens(key: AeadKey, sealed: bytes) -> list[tuple[str, Any]]:
    """(what, call) pairs that must each fail to open ``sealed``: every cause open refuses."""
    flipped_tag = sealed[:-1] + bytes([sealed[-1] ^ 0x80])
    flipped_body = bytes([sealed[0] ^ 1]) + sealed[1:]
    other = crypto.aead("AES-256-GCM").key(bytes(32))
    return [
        ("tag", lambda out: key.open_into(NONCE, flipped_tag, AAD, out)),
        ("ciphertext", lambda out: key.open_into(NONCE, flipped_body, AAD, out)),
        ("aad", lambda out: key.open_into(NONCE, sealed, AAD + b"!", out)),
        ("nonce", lambda out: key.open_into(bytes(12), sealed, AAD, out)),
        ("short nonce", lambda out: key.open_into(NONCE[:8], sealed, AAD, out)),
        ("key", lambda out: other.open_into(NONCE, sealed, AAD, out)),
    ]


@pytest.mark.parametrize("name", CIPHERS)
@pytest.mark.parametrize("size", [1, 64, 70_000])
def test_failed_open_into_is_decryption_failed_and_leaves_zeros(name: str, size: int) -> None:
    key = _key(name)
    plaintext = os.urandom(size)
    sealed = key.seal(NONCE, plaintext, AAD)
    for what, call in _bad_opens(key, sealed):
        out = bytearray(b"\xaa" * size)
        with pytest.raises(QflareError) as err:
            call(out)
        assert type(err.value) is DecryptionFailed, what
        assert str(err.value) == "decryption failed"
        # The cipher writes the plaintext before it checks the tag: none of it may remain.
        assert out == bytes(size), what


@pytest.mark.parametrize("name", CIPHERS)
def test_ciphertext_shorter_than_its_tag(name: str) -> None:
    key = _key(name)
    for n in range(TAG):
        with pytest.raises(QflareError) as err:
            key.open_into(NONCE, bytes(n), AAD, bytearray())
        assert type(err.value) is DecryptionFailed
        with pytest.raises(DecryptionFailed):
            key.open(NONCE, bytes(n), AAD)  # the same verdict as open


@pytest.mark.parametrize("name", CIPHERS)
@pytest.mark.parametrize("delta", [-16, -1, 1, 16])
def test_wrong_output_size_is_a_crypto_error_not_a_decryption_failure(
    name: str, delta: int
) -> None:
    key = _key(name)
    plaintext = os.urandom(100)
    sealed = key.seal(NONCE, plaintext, AAD)

    out = bytearray(b"\xaa" * (len(sealed) + delta))
    with pytest.raises(CryptoError) as err:
        key.seal_into(NONCE, plaintext, AAD, out)
    assert type(err.value) is CryptoError
    assert f"must be {len(sealed)} bytes, got {len(out)}" in str(err.value)
    assert out == b"\xaa" * len(out)  # refused before the cipher ran

    out = bytearray(b"\xaa" * (len(plaintext) + delta))
    with pytest.raises(CryptoError) as err:
        key.open_into(NONCE, sealed, AAD, out)
    assert type(err.value) is CryptoError  # the caller's mistake: not DecryptionFailed
    assert f"must be {len(plaintext)} bytes, got {len(out)}" in str(err.value)
    assert out == b"\xaa" * len(out)
    # The right size still works afterwards.
    right = bytearray(len(plaintext))
    assert key.open_into(NONCE, sealed, AAD, right) == len(plaintext) and right == plaintext


@pytest.mark.parametrize("name", CIPHERS)
def test_read_only_output_refused(name: str) -> None:
    key = _key(name)
    sealed = key.seal(NONCE, b"abc", AAD)
    with pytest.raises(TypeError):
        key.seal_into(NONCE, b"abc", AAD, bytes(3 + TAG))  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # a wrong type, not a forged ciphertext
        key.open_into(NONCE, sealed, AAD, bytes(3))  # type: ignore[arg-type]


def _qflare_parameters(group: Any, case: Any) -> bool:
    # As in test_classical: 256-bit keys, 96-bit nonces, 128-bit tags, plus the invalid
    # empty-nonce cases.
    return (
        group["keySize"] == 256
        and group["tagSize"] == 128
        and (group["ivSize"] == 96 or (group["ivSize"] == 0 and case["result"] == "invalid"))
    )


@pytest.mark.parametrize(("group", "case"), params("aes_gcm_test", keep=_qflare_parameters))
def test_aes_256_gcm_into(group: Any, case: Any) -> None:
    box = crypto.aead("AES-256-GCM").key(h(case["key"]))
    iv, aad, msg = h(case["iv"]), h(case["aad"]), h(case["msg"])
    sealed = h(case["ct"]) + h(case["tag"])
    out = bytearray(b"\xaa" * len(msg))
    if case["result"] == "invalid":
        with pytest.raises(QflareError) as err:
            box.open_into(iv, sealed, aad, out)
        assert type(err.value) is DecryptionFailed
        assert out == bytes(len(msg))
        return
    assert case["result"] == "valid"
    into = bytearray(len(sealed))
    box.seal_into(iv, msg, aad, into)
    assert into == sealed
    box.open_into(iv, sealed, aad, out)
    assert out == msg
