"""Secrets at rest: envelope encryption under a master key from a pluggable provider.

Each secret gets a fresh 256-bit data key; the data key encrypts the secret and the master key
wraps the data key, both with AES-256-GCM. The associated data names the row and column the
ciphertext belongs to (``Binding``), so a ciphertext copied into another row, another column or
another table fails to open: swapping two devices' encrypted session states in the database
does not swap their sessions, it breaks both.

Blob layout::

    u8 version=1 | opaque8 master_key_id | 12 wrap nonce | 48 wrapped data key
                 | 12 data nonce | ciphertext+tag
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import DecodeError, DecryptionFailed, KeyManagementError
from qflare.protocol.codec import Reader, Writer, check_identifier

_VERSION = 1
_AEAD = crypto.aead("AES-256-GCM")


class MasterKeyUnavailable(KeyManagementError):
    pass


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a ciphertext lives: it opens only there."""

    table: str
    row: str
    column: str

    def aad(self, master_key_id: str) -> bytes:
        w = Writer().opaque32(labels.ENVELOPE)
        for part in (self.table, self.row, self.column, master_key_id):
            w.opaque32(part.encode())
        return w.getvalue()


class MasterKeyProvider(Protocol):
    @property
    def current_id(self) -> str: ...

    def key(self, key_id: str) -> bytes: ...


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyUnavailable(f"master key in {where} is not valid base64") from None
    if len(key) != 32:
        raise MasterKeyUnavailable(f"master key in {where} must decode to 32 bytes")
    return key


class StaticMasterKey:
    """One master key held in memory: for tests and for the providers below."""

    def __init__(self, key: bytes, key_id: str = "mk-1") -> None:
        if len(key) != 32:
            raise MasterKeyUnavailable("a master key is 32 bytes")
        self._key = key
        self._id = check_identifier(key_id, "master key id")

    @property
    def current_id(self) -> str:
        return self._id

    def key(self, key_id: str) -> bytes:
        if key_id != self._id:
            raise MasterKeyUnavailable(f"master key {key_id!r} is not configured")
        return self._key

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self._id}>"


class EnvMasterKey(StaticMasterKey):
    """``QFLARE_MASTER_KEY`` (base64 of 32 bytes), with ``QFLARE_MASTER_KEY_ID`` naming it."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get("QFLARE_MASTER_KEY")
        if not value:
            raise MasterKeyUnavailable("QFLARE_MASTER_KEY is not set")
        super().__init__(
            _decode_key(value, "QFLARE_MASTER_KEY"), env.get("QFLARE_MASTER_KEY_ID", "mk-1")
        )


class FileMasterKey(StaticMasterKey):
    """A file holding the base64 master key; refused unless only its owner can read it."""

    def __init__(self, path: Path, key_id: str = "mk-1") -> None:
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise MasterKeyUnavailable(
                f"cannot read master key file {path}: {exc.strerror}"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MasterKeyUnavailable(
                f"master key file {path} must not be readable by others (chmod 600)"
            )
        super().__init__(_decode_key(text, str(path)), key_id)

    @staticmethod
    def create(path: Path) -> None:
        """Write a new random master key with mode 0600; never overwrite an existing one."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(crypto.system_rng(32)).decode() + "\n")


class Envelope:
    def __init__(self, provider: MasterKeyProvider, rng: crypto.Rng = crypto.system_rng) -> None:
        self._provider = provider
        self._rng = rng

    def seal(self, plaintext: bytes, binding: Binding) -> bytes:
        mk_id = self._provider.current_id
        aad = binding.aad(mk_id)
        data_key = self._rng(32)
        wrap_nonce, data_nonce = self._rng(12), self._rng(12)
        wrapped = _AEAD.key(self._provider.key(mk_id)).seal(wrap_nonce, data_key, aad)
        body = _AEAD.key(data_key).seal(data_nonce, plaintext, aad)
        return (
            Writer()
            .u8(_VERSION)
            .ident(mk_id)
            .fixed(wrap_nonce, 12)
            .fixed(wrapped, 48)
            .fixed(data_nonce, 12)
            .getvalue()
            + body
        )

    def open(self, blob: bytes, binding: Binding) -> bytes:
        try:
            r = Reader(blob)
            if r.u8() != _VERSION:
                raise DecodeError("unknown envelope version")
            mk_id = r.ident("master key id")
            wrap_nonce, wrapped, data_nonce = r.fixed(12), r.fixed(48), r.fixed(12)
            body = blob[r.position :]
        except DecodeError:
            raise DecryptionFailed() from None
        aad = binding.aad(mk_id)
        data_key = _AEAD.key(self._provider.key(mk_id)).open(wrap_nonce, wrapped, aad)
        return _AEAD.key(data_key).open(data_nonce, body, aad)

    def __repr__(self) -> str:
        return f"<Envelope provider={self._provider!r}>"
