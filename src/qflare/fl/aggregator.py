"""The server's side of federated learning: collect sealed updates, average them, move on.

One round at a time. A device fetches the global model of the current round, trains, and
submits an update for that round; when ``min_updates`` distinct devices have submitted, the
round closes with FedAvg and the next one starts. An update for another round, of the wrong
shape, or a second one from the same device in a round is refused with a typed error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from qflare.errors import LocalProtocolError
from qflare.fl.model import Array, decode_update, encode_update, fedavg


class UpdateRejected(LocalProtocolError):
    pass


@dataclass(slots=True)
class RoundResult:
    round_no: int
    devices: int
    samples: int


@dataclass(slots=True)
class Aggregator:
    features: int
    min_updates: int
    round_no: int = 0
    weights: Array = field(init=False)
    history: list[RoundResult] = field(default_factory=list)
    _pending: dict[str, tuple[Array, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.features < 1 or self.min_updates < 1:
            raise ValueError("features and min_updates must be positive")
        self.weights = np.zeros(self.features)

    def model(self) -> bytes:
        with self._lock:
            return encode_update(self.round_no, self.weights, 0)

    def submit(self, device_id: str, blob: bytes) -> RoundResult | None:
        """Accept one device's update; returns the round result when this update closed it."""
        round_no, weights, samples = decode_update(blob)
        with self._lock:
            if round_no != self.round_no:
                raise UpdateRejected(f"update for round {round_no}, current is {self.round_no}")
            if len(weights) != self.features or samples < 1:
                raise UpdateRejected("update has the wrong shape")
            if device_id in self._pending:
                raise UpdateRejected("one update per device per round")
            self._pending[device_id] = (weights, samples)
            if len(self._pending) < self.min_updates:
                return None
            updates = list(self._pending.values())
            self.weights = fedavg(updates)
            result = RoundResult(self.round_no, len(updates), sum(n for _, n in updates))
            self.history.append(result)
            self._pending.clear()
            self.round_no += 1
            return result
