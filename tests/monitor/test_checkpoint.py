"""Checkpoint notes: the C2SP tlog-checkpoint text, the signed-note key ID, strict parsing and
the signed-note verification rules."""

from __future__ import annotations

import base64
import hashlib

import pytest

from qflare import crypto
from qflare.crypto import labels
from qflare.monitor import checkpoint as cp
from qflare.monitor.checkpoint import CheckpointError, NoteSigner, NoteVerifier

ORIGIN = "qflare.test/default/audit"
ROOT = hashlib.sha256(b"root").digest()
ML_DSA_87 = crypto.signature("ML-DSA-87")
KEY = ML_DSA_87.generate(lambda n: bytes(range(n)))
OTHER = ML_DSA_87.generate(lambda n: bytes(reversed(range(n))))
PUBLIC = KEY.public_key().public_bytes()


def test_text_and_signature_line_follow_the_spec() -> None:
    note = NoteSigner(ORIGIN, KEY).sign(ORIGIN, 42, ROOT).note
    text, _, signatures = note.partition("\n\n")
    assert text + "\n" == f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\n"
    dash, name, encoded = signatures.rstrip("\n").split(" ")
    assert (dash, name) == ("\u2014", ORIGIN)
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 + ML_DSA_87.signature_size
    assert raw[:4] == cp.key_id(ORIGIN, PUBLIC)
    # The signature is over the note text, final newline included, with the checkpoint context.
    KEY.public_key().verify(raw[4:], (text + "\n").encode(), labels.SIG_AUDIT_CHECKPOINT)


def test_key_id_is_the_signed_note_recommendation_with_the_documented_type() -> None:
    assert cp.SIGNATURE_TYPE == b"\xffML-DSA-87/qflare/v1/sig/audit-checkpoint"
    expected = hashlib.sha256(ORIGIN.encode() + b"\n" + cp.SIGNATURE_TYPE + PUBLIC).digest()[:4]
    assert cp.key_id(ORIGIN, PUBLIC) == expected
    assert NoteVerifier(ORIGIN, PUBLIC).key_id == expected
    # The name is part of the ID: the same key under another name is another key.
    assert cp.key_id("other.example/log", PUBLIC) != expected


def test_round_trip() -> None:
    signed = NoteSigner(ORIGIN, KEY).sign(ORIGIN, 7, ROOT)
    got = cp.verify_checkpoint(signed.note, [NoteVerifier(ORIGIN, PUBLIC)], origin=ORIGIN)
    assert (got.origin, got.size, got.root) == (ORIGIN, 7, ROOT)
    assert cp.parse_checkpoint(signed.note).checkpoint == got


def test_signed_note_key_rules() -> None:
    ours = NoteSigner(ORIGIN, KEY).sign(ORIGIN, 7, ROOT).note
    theirs = NoteSigner(ORIGIN, OTHER).sign(ORIGIN, 7, ROOT).note
    trusted = [NoteVerifier(ORIGIN, PUBLIC)]
    # A note signed only by an unknown key: nothing trusted verified it.
    with pytest.raises(CheckpointError, match="no trusted key"):
        cp.verify_checkpoint(theirs, trusted)
    # A cosignature by an unknown key (a witness) is ignored.
    both = ours + theirs.partition("\n\n")[2]
    assert cp.verify_checkpoint(both, trusted).size == 7
    assert cp.signed_by(both, trusted) == trusted
    # A signature line that names a trusted key but does not verify rejects the whole note.
    forged_sig = base64.b64encode(cp.key_id(ORIGIN, PUBLIC) + bytes(ML_DSA_87.signature_size))
    forged = ours + f"\u2014 {ORIGIN} {forged_sig.decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        cp.verify_checkpoint(forged, trusted)


@pytest.mark.parametrize(
    ("size", "root"), [(8, ROOT), (7, hashlib.sha256(b"other").digest())], ids=["size", "root"]
)
def test_a_changed_tree_head_does_not_verify(size: int, root: bytes) -> None:
    signed = NoteSigner(ORIGIN, KEY).sign(ORIGIN, 7, ROOT)
    altered = cp.checkpoint_text(ORIGIN, size, root) + "\n" + signed.note.partition("\n\n")[2]
    with pytest.raises(CheckpointError, match="does not verify"):
        cp.verify_checkpoint(altered, [NoteVerifier(ORIGIN, PUBLIC)])


def test_another_logs_checkpoint_is_refused() -> None:
    signed = NoteSigner("other.example/log", KEY).sign("other.example/log", 7, ROOT)
    trusted = [NoteVerifier("other.example/log", PUBLIC)]
    assert cp.verify_checkpoint(signed.note, trusted).origin == "other.example/log"
    with pytest.raises(CheckpointError, match="not"):
        cp.verify_checkpoint(signed.note, trusted, origin=ORIGIN)


def test_a_signature_with_another_context_does_not_verify() -> None:
    text = cp.checkpoint_text(ORIGIN, 7, ROOT)
    sig = KEY.sign(text.encode(), labels.SIG_ENROLLMENT)
    line = base64.b64encode(cp.key_id(ORIGIN, PUBLIC) + sig).decode()
    with pytest.raises(CheckpointError, match="does not verify"):
        cp.verify_checkpoint(f"{text}\n\u2014 {ORIGIN} {line}\n", [NoteVerifier(ORIGIN, PUBLIC)])


GOOD = NoteSigner(ORIGIN, KEY).sign(ORIGIN, 7, ROOT).note
SIG_LINES = GOOD.partition("\n\n")[2]
ROOT64 = base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    "note",
    [
        "",
        GOOD.replace("\n\n", "\n"),  # no blank line
        f"{ORIGIN}\n7\n\n{SIG_LINES}",  # two lines
        f"{ORIGIN}\n7\n{ROOT64}\nextension\n\n{SIG_LINES}",  # extension line
        f"\n7\n{ROOT64}\n\n{SIG_LINES}",  # empty origin
        f"{ORIGIN}\n07\n{ROOT64}\n\n{SIG_LINES}",  # leading zero
        f"{ORIGIN}\n-7\n{ROOT64}\n\n{SIG_LINES}",
        f"{ORIGIN}\n7\n{base64.b64encode(ROOT[:31]).decode()}\n\n{SIG_LINES}",  # short root
        f"{ORIGIN}\n7\n{ROOT64[:-2]}==\n\n{SIG_LINES}",  # non-canonical base64
        GOOD.rstrip("\n"),  # signature line without newline
        GOOD.replace("\u2014", "-"),  # not an em dash
        GOOD.replace(f"\u2014 {ORIGIN} ", f"\u2014 {ORIGIN}+x "),  # '+' in the key name
        GOOD.replace("\n7\n", "\n7\r\n"),  # control character
        f"{ORIGIN}\n7\n{ROOT64}\n\n",  # no signature
        f"{ORIGIN}\n7\n{ROOT64}\n\n" + SIG_LINES * 17,  # too many signatures
        f"{ORIGIN}\n7\n{ROOT64}\n\n\u2014 {ORIGIN} AAAA\n",  # a key ID and no signature
    ],
)
def test_strict_parsing(note: str) -> None:
    with pytest.raises(CheckpointError):
        cp.parse_checkpoint(note)


def test_signing_refuses_what_it_could_not_parse() -> None:
    signer = NoteSigner(ORIGIN, KEY)
    for origin, size, root in (("", 1, ROOT), ("a\nb", 1, ROOT), (ORIGIN, -1, ROOT)):
        with pytest.raises(CheckpointError):
            signer.sign(origin, size, root)
    with pytest.raises(CheckpointError):
        signer.sign(ORIGIN, 1, ROOT[:16])
    with pytest.raises(CheckpointError):
        NoteSigner("has space", KEY)


def test_a_verifier_with_a_bad_public_key_rejects() -> None:
    # Same name, another key: its key ID differs, so the note's signature is from an unknown key.
    bad = NoteVerifier(ORIGIN, PUBLIC[:-1] + bytes([PUBLIC[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="no trusted key"):
        cp.verify_checkpoint(GOOD, [bad])
    short = NoteVerifier(ORIGIN, b"\x00" * 10)
    forged = (
        f"{cp.checkpoint_text(ORIGIN, 7, ROOT)}\n\u2014 {ORIGIN} "
        + base64.b64encode(short.key_id + b"sig").decode()
        + "\n"
    )
    with pytest.raises(CheckpointError, match="not an ML-DSA-87"):
        cp.verify_checkpoint(forged, [short])
