"""Sliding anti-replay window for records, one per epoch (docs/PROTOCOL.md section 8.3).

The classic IPsec/DTLS bitmap (RFC 4303 3.4.3): remember the highest sequence number accepted
and which of the ``WINDOW`` numbers below it were seen. A number seen before, or too far below
the highest to judge, is refused. The state is small and can be saved and restored, so a
server restart neither forgets accepted records nor refuses fresh ones.
"""

from __future__ import annotations

from qflare.errors import DecodeError, ReplayDetected
from qflare.protocol.codec import Reader, Writer

WINDOW = 256
_MASK = (1 << WINDOW) - 1


class ReplayWindow:
    __slots__ = ("bitmap", "highest")

    def __init__(self, highest: int = -1, bitmap: int = 0) -> None:
        self.highest = highest
        self.bitmap = bitmap

    def check(self, seq: int) -> None:
        """Raise ``ReplayDetected`` if ``seq`` must be refused. Does not record it."""
        if seq > self.highest:
            return
        offset = self.highest - seq
        if offset >= WINDOW:
            raise ReplayDetected("record too old for the replay window")
        if self.bitmap >> offset & 1:
            raise ReplayDetected("record replayed")

    def accept(self, seq: int) -> None:
        """Record ``seq`` as seen. Call only after the record authenticated."""
        self.check(seq)
        if seq > self.highest:
            shift = seq - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & _MASK if shift < WINDOW else 1
            self.highest = seq
        else:
            self.bitmap |= 1 << (self.highest - seq)


class EpochReplayWindows:
    """One window per retained epoch; windows of erased epochs are dropped with their keys."""

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[int, ReplayWindow] = {}

    def window(self, epoch: int) -> ReplayWindow:
        return self._windows.setdefault(epoch, ReplayWindow())

    def forget_before(self, epoch: int) -> None:
        for old in [e for e in self._windows if e < epoch]:
            del self._windows[old]

    def export(self) -> bytes:
        w = Writer().u8(len(self._windows))
        for epoch in sorted(self._windows):
            win = self._windows[epoch]
            w.u64(epoch).u64(win.highest + 1).fixed(win.bitmap.to_bytes(WINDOW // 8, "big"), 32)
        return w.getvalue()

    @classmethod
    def restore(cls, data: bytes) -> EpochReplayWindows:
        r = Reader(data)
        out = cls()
        for _ in range(r.u8()):
            epoch = r.u64()
            if epoch in out._windows:
                raise DecodeError("duplicate epoch in replay state")
            out._windows[epoch] = ReplayWindow(r.u64() - 1, int.from_bytes(r.fixed(32), "big"))
        r.done()
        return out
