"""A small federated-learning workload: logistic regression on synthetic, non-IID data.

Deliberately tiny (numpy only) so the demo runs in seconds on two cores; what matters is that
real model updates travel through QFLARE sealed with session keys and that FedAvg over them
actually learns (accuracy rises round by round).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qflare.errors import DecodeError
from qflare.protocol.codec import Reader, Writer

Array = npt.NDArray[np.float64]
_MAGIC = b"QFW1"


@dataclass(frozen=True, slots=True)
class Dataset:
    x: Array
    y: Array


def make_federated_data(
    n_devices: int, *, features: int = 20, samples: int = 200, seed: int = 0
) -> tuple[list[Dataset], Dataset]:
    """One shared true model, device shards skewed in label balance and feature shift."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=features)
    shards = []
    for i in range(n_devices):
        # Non-IID: each device sees a shifted feature distribution, so its labels lean one way.
        shift = rng.normal(scale=1.5, size=features) * (1 if i % 2 else -1)
        x = rng.normal(size=(samples, features)) + shift * 0.5
        y = (x @ w_true + rng.normal(scale=0.5, size=samples) > 0).astype(np.float64)
        shards.append(Dataset(x, y))
    x_test = rng.normal(size=(2000, features))
    y_test = (x_test @ w_true > 0).astype(np.float64)
    return shards, Dataset(x_test, y_test)


def _sigmoid(z: Array) -> Array:
    out: Array = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    return out


def train_local(weights: Array, data: Dataset, *, epochs: int = 5, lr: float = 0.1) -> Array:
    w = weights.copy()
    for _ in range(epochs):
        grad = data.x.T @ (_sigmoid(data.x @ w) - data.y) / len(data.y)
        w -= lr * grad
    return w


def accuracy(weights: Array, data: Dataset) -> float:
    return float(np.mean((_sigmoid(data.x @ weights) > 0.5) == (data.y > 0.5)))


def fedavg(updates: list[tuple[Array, int]]) -> Array:
    """Average the updates weighted by each device's sample count (McMahan et al. 2017)."""
    if not updates:
        raise ValueError("FedAvg needs at least one update")
    total = sum(n for _, n in updates)
    out: Array = sum((w * (n / total) for w, n in updates), np.zeros_like(updates[0][0]))
    return out


def encode_update(round_no: int, weights: Array, samples: int) -> bytes:
    data = np.asarray(weights, dtype="<f8").tobytes()
    return (
        Writer().fixed(_MAGIC, 4).u32(round_no).u32(samples).u32(len(weights)).getvalue() + data
    )


def decode_update(blob: bytes) -> tuple[int, Array, int]:
    r = Reader(blob[:16])
    if r.fixed(4) != _MAGIC:
        raise DecodeError("not a model update")
    round_no, samples, n = r.u32(), r.u32(), r.u32()
    body = blob[16:]
    if len(body) != 8 * n or n == 0:
        raise DecodeError("model update has the wrong length")
    weights: Array = np.frombuffer(body, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(weights)):
        raise DecodeError("model update holds non-finite weights")
    return round_no, weights, samples
