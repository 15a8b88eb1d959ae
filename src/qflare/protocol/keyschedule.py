"""Key derivation: the handshake schedule (section 6) and the temporal epoch chain (section 7).

Every derivation's ``info`` is built from length-prefixed parts that start with a versioned
label from ``qflare.crypto.labels``, so no two derivations can collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare import crypto
from qflare.crypto import labels
from qflare.errors import DecodeError, EpochExpired, LocalProtocolError
from qflare.protocol.codec import Reader, Writer

KEY_SIZE = 32
IV_SIZE = 12


def info(*parts: bytes) -> bytes:
    """``lp(part_1) || lp(part_2) || ...``, each part after its u32 length (one copy of each
    part: the transcript parts are kilobytes)."""
    out: list[bytes] = []
    for part in parts:
        out.append(len(part).to_bytes(4, "big"))
        out.append(part)
    return b"".join(out)


def u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


# --- Handshake (section 6) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeContext:
    """Who is talking: both identities go into every handshake derivation."""

    device_id: str
    server_key_id: str

    def ids(self) -> tuple[bytes, bytes]:
        return self.device_id.encode(), self.server_key_id.encode()


def transcript_hash(kdf: crypto.Hkdf, *messages: bytes) -> bytes:
    return kdf.hash(info(labels.TRANSCRIPT, *messages))


def handshake_secret(kdf: crypto.Hkdf, static_secret: bytes, ephemeral_secret: bytes) -> bytes:
    # Both secrets feed one extract: the result is secret if either KEM exchange is, so the
    # session keeps forward secrecy (ephemeral) and server authentication (static) at once.
    return kdf.extract(labels.HANDSHAKE_SECRET, info(static_secret, ephemeral_secret))


def finished_key(kdf: crypto.Hkdf, hs: bytes, ctx: HandshakeContext, *, server: bool) -> bytes:
    label, role = (
        (labels.SERVER_FINISHED, labels.ROLE_SERVER)
        if server
        else (labels.CLIENT_FINISHED, labels.ROLE_DEVICE)
    )
    return kdf.expand(hs, info(label, role, *ctx.ids()), kdf.digest_size)


def session_secret(
    kdf: crypto.Hkdf, hs: bytes, ctx: HandshakeContext, session_id: bytes, th_final: bytes
) -> bytes:
    return kdf.expand(hs, info(labels.SESSION_SECRET, *ctx.ids(), session_id, th_final), KEY_SIZE)


# --- Temporal key schedule (section 7) -----------------------------------------------------------


def epoch_of(now: float, epoch_seconds: int) -> int:
    if now < 0:
        raise LocalProtocolError("time before the Unix epoch")
    return int(now // epoch_seconds)


class EpochKeySchedule:
    """A one-way chain of epoch keys with a grace window.

    ``chain(e+1) = HKDF-Expand(chain(e), CHAIN_NEXT || e+1)``. Only the chain keys of epochs
    ``newest - grace .. newest`` are kept; older ones are overwritten with zeros and dropped.
    Going forward is one HKDF call; going back needs a preimage of HKDF-Expand, so a snapshot
    taken in epoch e+1 reveals nothing about epoch e once e is outside the window.

    Python cannot promise that no copy of a key survives elsewhere in memory (the interpreter
    may have copied a buffer); zeroing the chain keys we hold is the part we control.
    """

    __slots__ = ("_chain", "_kdf", "grace", "session_id")

    def __init__(
        self, kdf: crypto.Hkdf, session_id: bytes, chain: dict[int, bytearray], grace: int
    ) -> None:
        if not chain:
            raise LocalProtocolError("an epoch schedule needs at least one chain key")
        self._kdf = kdf
        self.session_id = session_id
        self._chain = chain
        self.grace = grace

    @classmethod
    def start(
        cls, kdf: crypto.Hkdf, secret: bytes, session_id: bytes, epoch: int, grace: int = 1
    ) -> EpochKeySchedule:
        first = kdf.expand(secret, info(labels.CHAIN_INIT, session_id, u64(epoch)), KEY_SIZE)
        return cls(kdf, session_id, {epoch: bytearray(first)}, grace)

    @property
    def newest(self) -> int:
        return max(self._chain)

    @property
    def oldest(self) -> int:
        return min(self._chain)

    def retained(self) -> list[int]:
        return sorted(self._chain)

    def advance_to(self, epoch: int) -> None:
        """Ratchet forward to ``epoch`` and erase what falls out of the grace window."""
        newest = self.newest
        while newest < epoch:
            self._chain[newest + 1] = bytearray(self._chain_key(newest + 1))
            newest += 1
            self._erase_before(newest - self.grace)

    def _erase_before(self, epoch: int) -> None:
        for old in [e for e in self._chain if e < epoch]:
            key = self._chain.pop(old)
            key[:] = bytes(len(key))

    def derive(self, purpose: str, direction: int, epoch: int, size: int = KEY_SIZE) -> bytes:
        """A key bound to one purpose, direction and epoch."""
        return self._expand(labels.PURPOSE_KEY, purpose, direction, epoch, size)

    def derive_iv(self, purpose: str, direction: int, epoch: int) -> bytes:
        return self._expand(labels.PURPOSE_IV, purpose, direction, epoch, IV_SIZE)

    def _chain_key(self, epoch: int) -> bytes:
        chain = self._chain.get(epoch)
        if chain is not None:
            return bytes(chain)
        if epoch < self.oldest:
            raise EpochExpired(f"keys of epoch {epoch} are erased")
        # Ahead of the schedule: walk forward without storing, so that deriving a key to try
        # an unauthenticated record never erases anything. ``advance_to`` commits the move.
        key, at = bytes(self._chain[self.newest]), self.newest
        while at < epoch:
            key = self._kdf.expand(key, info(labels.CHAIN_NEXT, u64(at + 1)), KEY_SIZE)
            at += 1
        return key

    def _expand(self, label: bytes, purpose: str, direction: int, epoch: int, size: int) -> bytes:
        return self._kdf.expand(
            self._chain_key(epoch),
            info(label, purpose.encode(), bytes([direction]), u64(epoch), self.session_id),
            size,
        )

    def erase(self) -> None:
        self._erase_before(self.newest + 1)

    # Saved state is secret: qflare.keys seals it before it reaches the store.
    def export(self) -> bytes:
        w = Writer().u8(self.grace).u8(len(self._chain))
        for epoch in self.retained():
            w.u64(epoch).fixed(bytes(self._chain[epoch]), KEY_SIZE)
        return w.getvalue()

    @classmethod
    def restore(cls, kdf: crypto.Hkdf, session_id: bytes, data: bytes) -> EpochKeySchedule:
        r = Reader(data)
        grace = r.u8()
        n = r.u8()
        if not 1 <= n <= grace + 1:
            raise DecodeError("epoch schedule holds a wrong number of keys")
        chain = {r.u64(): bytearray(r.fixed(KEY_SIZE)) for _ in range(n)}
        r.done()
        if len(chain) != n or max(chain) - min(chain) != n - 1:
            raise DecodeError("epoch schedule keys are not consecutive")
        return cls(kdf, session_id, chain, grace)

    def __repr__(self) -> str:
        return f"<EpochKeySchedule epochs={self.retained()}>"
