"""Sliding anti-replay window for records, one per epoch (docs/PROTOCOL.md section 8.3).

The classic IPsec/DTLS bitmap (RFC 4303 3.4.3): remember the highest sequence number accepted
and which of the ``WINDOW`` numbers below it were seen. A number seen before, or too far below
the highest to judge, is refused. The state is small and can be saved and restored, so a
server restart neither forgets accepted records nor refuses fresh ones.
"""

from __future__ import annotations

from typing import Final

from qflare.errors import DecodeError, ReplayDetected
from qflare.protocol.codec import Reader, Writer

WINDOW = 256
_MASK = (1 << WINDOW) - 1
_BITMAP_SIZE = WINDOW // 8
# First byte of the saved state since format 2. Format 1 began with a u8 window count: one per
# retained epoch (two by default), so 255 only with a grace of 253 epochs or more.
FORMAT_2: Final = 0xFF


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


_EMPTY: Final = ReplayWindow()  # never mutated: what an epoch without a window checks against


class EpochReplayWindows:
    """One window per epoch that has accepted a record; windows of erased epochs are dropped
    with their keys.

    A window is created only by ``accept``, that is only by an authenticated record: checking
    an unauthenticated one leaves this object, and so the saved state, unchanged.
    """

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[int, ReplayWindow] = {}

    def window(self, epoch: int) -> ReplayWindow:
        """The window of ``epoch``, created empty if absent (for tests and tools; the record
        layer uses ``check`` and ``accept``)."""
        return self._windows.setdefault(epoch, ReplayWindow())

    def check(self, epoch: int, seq: int) -> None:
        """Raise ``ReplayDetected`` if ``seq`` must be refused in ``epoch``. Changes nothing."""
        self._windows.get(epoch, _EMPTY).check(seq)

    def accept(self, epoch: int, seq: int) -> None:
        """Record ``seq`` as seen in ``epoch``. Call only after the record authenticated."""
        window = self._windows.get(epoch)
        if window is None:
            window = self._windows[epoch] = ReplayWindow()
        window.accept(seq)

    def epochs(self) -> list[int]:
        return sorted(self._windows)

    def forget_before(self, epoch: int) -> None:
        for old in [e for e in self._windows if e < epoch]:
            del self._windows[old]

    def export(self) -> bytes:
        """Format 2: ``u8 0xFF | u16 n | n x (u64 epoch | u64 highest | 32-byte bitmap)``,
        epochs ascending, empty windows left out (an empty window and no window behave alike).
        """
        windows = [(e, w) for e, w in sorted(self._windows.items()) if w.highest >= 0]
        w = Writer().u8(FORMAT_2).u16(len(windows))
        for epoch, win in windows:
            w.u64(epoch).u64(win.highest).fixed(win.bitmap.to_bytes(_BITMAP_SIZE, "big"), 32)
        return w.getvalue()

    @classmethod
    def restore(cls, data: bytes) -> EpochReplayWindows:
        """Read format 2, or format 1 (``u8 n | n x (u64 epoch | u64 highest+1 | bitmap)``),
        which earlier versions wrote and could not represent ``highest = 2**64 - 1`` in."""
        r = Reader(data)
        out = cls()
        first = r.u8()
        legacy = first != FORMAT_2
        count = first if legacy else r.u16()
        last, seen = -1, set[int]()
        for _ in range(count):
            epoch = r.u64()
            if epoch in seen:
                raise DecodeError("duplicate epoch in replay state")
            seen.add(epoch)
            highest = r.u64() - 1 if legacy else r.u64()
            bitmap = int.from_bytes(r.fixed(_BITMAP_SIZE), "big")
            if legacy:
                if highest < 0:
                    if bitmap:
                        raise DecodeError("empty replay window with bits set")
                    continue  # an empty window: same behaviour as none
            elif epoch <= last:
                raise DecodeError("replay state epochs not ascending")
            # Every accepted window has seen its highest number: bit 0 is always set.
            if not bitmap & 1:
                raise DecodeError("replay window has not seen its highest sequence number")
            last = epoch
            out._windows[epoch] = ReplayWindow(highest, bitmap)
        r.done()
        return out
