"""Audit log checkpoints: C2SP tlog-checkpoint notes signed with ML-DSA-87.

A checkpoint (c2sp.org/tlog-checkpoint) is a signed note (c2sp.org/signed-note) whose text is
three lines: the log's origin, the tree size in decimal, and the base64 RFC 6962 tree head::

    qflare.local/default/audit
    42
    3wW0ZbS7nB6yLq2uU9q0vKX5O1QfVQbJ0mJ4tq4a0uA=

    — qflare.local/default/audit q4+Vf3...(base64 of key ID || signature)...

The text is signed as it stands (final newline included) with ML-DSA-87 and the FIPS 204
context ``labels.SIG_AUDIT_CHECKPOINT``, so no other QFLARE signature can pass as a checkpoint.

Key ID. signed-note recommends ``SHA-256(key name || 0x0A || signature type || public key)[:4]``
with a one-byte signature type. No byte is assigned to ML-DSA-87 with a context (0x06 is the
ML-DSA-44 *cosignature*, which signs a different binary message), so QFLARE uses the spec's
escape: type ``0xFF`` followed by a longer identifier that names the algorithm and the context,
``0xFF || "ML-DSA-87/" || labels.SIG_AUDIT_CHECKPOINT`` (``SIGNATURE_TYPE`` below). The key ID
is an identifier, not a security boundary: a verifier is configured with the public key itself.

Parsing is strict: exactly the three lines QFLARE writes (no extension lines), canonical decimal
and base64, a 32-byte root, at most ``MAX_SIGNATURES`` signature lines, no control characters.
Verification follows signed-note: signatures from unknown keys (name and key ID) are ignored,
one from a known key that fails rejects the whole note, and at least one must verify. Pure: no
I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import InvalidKey, InvalidSignature, QflareError
from qflare.monitor.merkle import HASH_SIZE

ALGORITHM: Final = "ML-DSA-87"
SIGNATURE_TYPE: Final = b"\xff" + b"ML-DSA-87/" + labels.SIG_AUDIT_CHECKPOINT
CONTEXT: Final = labels.SIG_AUDIT_CHECKPOINT
MAX_SIGNATURES: Final = 16
MAX_NOTE: Final = 16 * 4096  # 16 ML-DSA-87 signatures in base64 and then some
_DASH: Final = "\u2014 "
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,18}")
_NAME: Final = re.compile(r"[^\s+]+")
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


class CheckpointError(QflareError):
    """A checkpoint note that is malformed, or not signed by a trusted key."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{what} is not base64") from None
    # Non-canonical base64 (stray padding bits) would give one value two spellings.
    if base64.b64encode(raw).decode() != text:
        raise CheckpointError(f"{what} is not canonical base64")
    return raw


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise CheckpointError("a key name is non-empty, without spaces or '+'")
    return name


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key ID of an ML-DSA-87 audit key under ``name``."""
    _check_name(name)
    sha256 = crypto.kdf("HKDF-SHA256").hash
    return sha256(name.encode() + b"\n" + SIGNATURE_TYPE + public_key)[:4]


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    """The note text of a checkpoint (what is signed), final newline included."""
    if not origin or _CONTROL.search(origin) or "\n" in origin:
        raise CheckpointError("the origin is one non-empty line")
    if size < 0:
        raise CheckpointError("a tree size is not negative")
    if len(root) != HASH_SIZE:
        raise CheckpointError(f"a root hash is {HASH_SIZE} bytes")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head (``origin``, ``size``, ``root``) and the signed note that states it."""

    origin: str
    size: int
    root: bytes
    note: str = field(repr=False)

    @property
    def text(self) -> str:
        return checkpoint_text(self.origin, self.size, self.root)


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ParsedNote:
    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]


class NoteSigner:
    """Signs checkpoints with one ML-DSA-87 audit key under the key name ``name``."""

    __slots__ = ("_key", "key_id", "name")

    def __init__(self, name: str, private_key: crypto.SignaturePrivateKey) -> None:
        self.name = _check_name(name)
        self._key = private_key
        self.key_id = key_id(name, private_key.public_key().public_bytes())

    def __repr__(self) -> str:
        return f"<NoteSigner {self.name} {self.key_id.hex()}>"

    def sign(self, origin: str, size: int, root: bytes) -> Checkpoint:
        text = checkpoint_text(origin, size, root)
        signature = self._key.sign(text.encode(), CONTEXT)
        line = f"{_DASH}{self.name} {base64.b64encode(self.key_id + signature).decode()}\n"
        return Checkpoint(origin, size, root, f"{text}\n{line}")


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A trusted audit key: the key name it signs under and its ML-DSA-87 public key."""

    name: str
    public_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def verify(self, text: str, signature: bytes) -> None:
        try:
            public = crypto.signature(ALGORITHM).from_public_bytes(self.public_key)
        except InvalidKey:
            raise CheckpointError(f"the key {self.name} is not an {ALGORITHM} public key") from None
        try:
            public.verify(signature, text.encode(), CONTEXT)
        except InvalidSignature:
            raise CheckpointError(f"the signature of {self.name} does not verify") from None


def parse_checkpoint(note: str) -> ParsedNote:
    """Split and check a checkpoint note; nothing is verified yet (see ``verify_checkpoint``)."""
    if len(note) > MAX_NOTE:
        raise CheckpointError("the note is too long")
    if _CONTROL.search(note):
        raise CheckpointError("a note holds no control characters but newlines")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise CheckpointError("a note is text, a blank line, then signature lines")
    text, signed = note[: cut + 1], note[cut + 2 :]
    lines = text.split("\n")[:-1]
    if len(lines) != 3:
        raise CheckpointError("a checkpoint is exactly three lines: origin, size, root")
    origin, size_text, root_text = lines
    if not origin:
        raise CheckpointError("the origin line is empty")
    if not _DECIMAL.fullmatch(size_text):
        raise CheckpointError("the tree size is not a canonical decimal")
    root = _b64decode(root_text, "the root hash")
    if len(root) != HASH_SIZE:
        raise CheckpointError(f"the root hash is not {HASH_SIZE} bytes")
    if not signed.endswith("\n"):
        raise CheckpointError("the last signature line has no newline")
    signatures = []
    for line in signed[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise CheckpointError("a signature line starts with an em dash and a space")
        name, space, encoded = line[len(_DASH) :].partition(" ")
        if not space:
            raise CheckpointError("a signature line is a key name and a signature")
        raw = _b64decode(encoded, "a signature")
        if len(raw) < 5:
            raise CheckpointError("a signature is a key ID and at least one byte")
        signatures.append(NoteSignature(_check_name(name), raw[:4], raw[4:]))
    if not signatures or len(signatures) > MAX_SIGNATURES:
        raise CheckpointError(f"a note carries 1..{MAX_SIGNATURES} signatures")
    return ParsedNote(Checkpoint(origin, int(size_text), root, note), tuple(signatures))


def verify_checkpoint(
    note: str, keys: Sequence[NoteVerifier], *, origin: str | None = None
) -> Checkpoint:
    """The checkpoint, if a trusted key signed it; ``CheckpointError`` otherwise.

    With ``origin``, the note must also name that log: a valid checkpoint of another log signed
    by a key shared with it must not pass as this log's.
    """
    parsed = parse_checkpoint(note)
    checkpoint = parsed.checkpoint
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"the checkpoint is for {checkpoint.origin!r}, not {origin!r}")
    trusted = {(k.name, k.key_id): k for k in keys}
    verified = 0
    for sig in parsed.signatures:
        key = trusted.get((sig.name, sig.key_id))
        if key is None:
            continue  # signed-note: ignore unknown keys (witnesses, rotated-out keys)
        key.verify(checkpoint.text, sig.signature)
        verified += 1
    if not verified:
        raise CheckpointError("no trusted key signed the checkpoint")
    return checkpoint


def signed_by(note: str, keys: Sequence[NoteVerifier]) -> list[NoteVerifier]:
    """The trusted keys among a note's signers (by name and key ID, not yet verified)."""
    ids = {(s.name, s.key_id) for s in parse_checkpoint(note).signatures}
    return [k for k in keys if (k.name, k.key_id) in ids]


__all__ = [
    "ALGORITHM",
    "CONTEXT",
    "SIGNATURE_TYPE",
    "Checkpoint",
    "CheckpointError",
    "NoteSignature",
    "NoteSigner",
    "NoteVerifier",
    "ParsedNote",
    "checkpoint_text",
    "key_id",
    "parse_checkpoint",
    "signed_by",
    "verify_checkpoint",
]
