"""The biscuit: the server's pending handshake state, sealed and handed to the device
(docs/PROTOCOL.md section 10).

Between ServerHello and ClientFinish the server stores nothing. It seals what it will need into
an AEAD token under a biscuit key that every replica shares, and the device echoes it. Any
replica can then finish any handshake, and a flood of ClientHellos costs the server no memory.

Wire form: ``u8 key_id | 12-byte random nonce | AEAD(ciphertext)``, with the session id and the
BISCUIT label as associated data, so a biscuit cannot be moved to another session.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import DecodeError, DecryptionFailed, HandshakeFailed
from qflare.protocol.codec import Reader, Writer

_AEAD = "AES-256-GCM"
_NONCE = 12
MAX_KEY_ID = 0xFF
# u16 suite | u64 server_time | u32 epoch_seconds | u64 expires_at
_TIMES = struct.Struct(">HQIQ")


@dataclass(frozen=True, slots=True, kw_only=True)
class BiscuitContents:
    session_id: bytes
    device_id: str
    server_key_id: str
    suite: int
    server_time: int
    epoch_seconds: int
    expires_at: int
    handshake_secret: bytes = field(repr=False)
    transcript_hash: bytes = field(repr=False)

    def encode(self) -> bytes:
        w = Writer().ident(self.device_id).ident(self.server_key_id)
        w.fixed(
            _TIMES.pack(self.suite, self.server_time, self.epoch_seconds, self.expires_at),
            _TIMES.size,
        )
        return w.opaque8(self.handshake_secret).opaque8(self.transcript_hash).getvalue()

    @classmethod
    def decode(cls, session_id: bytes, data: bytes) -> BiscuitContents:
        r = Reader(data)
        device_id = r.ident("device id")
        server_key_id = r.ident("server key id")
        suite, server_time, epoch_seconds, expires_at = _TIMES.unpack(r.fixed(_TIMES.size))
        out = cls(
            session_id=session_id,
            device_id=device_id,
            server_key_id=server_key_id,
            suite=suite,
            server_time=server_time,
            epoch_seconds=epoch_seconds,
            expires_at=expires_at,
            handshake_secret=r.opaque8(min_len=32, max_len=64),
            transcript_hash=r.opaque8(min_len=32, max_len=64),
        )
        r.done()
        return out


class BiscuitKeys:
    """The replicas' shared biscuit keys: one current key id for sealing, all for opening.

    Rotating means adding a new key and making it current; keep the old one for at least the
    biscuit lifetime so handshakes in flight still finish.
    """

    __slots__ = ("_aead", "_keys", "current")

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        # The wire carries the key id in one byte: an id outside 0..255 could never be sealed
        # (or found again when opening), so it is refused here rather than on every handshake.
        for kid in keys:
            if isinstance(kid, bool) or not isinstance(kid, int) or not 0 <= kid <= MAX_KEY_ID:
                raise ValueError(f"biscuit key ids must be integers 0..{MAX_KEY_ID}, got {kid!r}")
        if current not in keys:
            raise ValueError("the current biscuit key id must be one of the keys")
        aead = crypto.aead(_AEAD)
        self._keys = {kid: aead.key(k) for kid, k in keys.items()}
        self.current = current

    def seal(self, contents: BiscuitContents, nonce: bytes) -> bytes:
        aad = labels.BISCUIT + contents.session_id
        sealed = self._keys[self.current].seal(nonce, contents.encode(), aad)
        return bytes([self.current]) + nonce + sealed

    def open(self, session_id: bytes, biscuit: bytes, *, now: int) -> BiscuitContents:
        if len(biscuit) < 1 + _NONCE + 16:
            raise HandshakeFailed("biscuit-malformed")
        key = self._keys.get(biscuit[0])
        if key is None:
            raise HandshakeFailed("biscuit-unknown-key")
        try:
            nonce, sealed = biscuit[1 : 1 + _NONCE], biscuit[1 + _NONCE :]
            plain = key.open(nonce, sealed, labels.BISCUIT + session_id)
            contents = BiscuitContents.decode(session_id, plain)
        except (DecryptionFailed, DecodeError):
            raise HandshakeFailed("biscuit-invalid") from None
        if now > contents.expires_at:
            raise HandshakeFailed("biscuit-expired")
        return contents

    def __repr__(self) -> str:
        return f"<BiscuitKeys ids={sorted(self._keys)} current={self.current}>"
