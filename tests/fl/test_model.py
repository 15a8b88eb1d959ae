from __future__ import annotations

import numpy as np
import pytest

from qflare.errors import DecodeError
from qflare.fl.model import (
    accuracy,
    decode_update,
    encode_update,
    fedavg,
    make_federated_data,
    train_local,
)


def test_fedavg_learns_on_non_iid_shards() -> None:
    shards, test = make_federated_data(8, seed=3)
    w = np.zeros(test.x.shape[1])
    start = accuracy(w, test)
    for _ in range(5):
        w = fedavg([(train_local(w, s), len(s.y)) for s in shards])
    assert accuracy(w, test) > max(start, 0.8)


def test_fedavg_weights_by_samples() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert np.allclose(fedavg([(a, 3), (b, 1)]), [0.75, 0.25])
    with pytest.raises(ValueError):
        fedavg([])


def test_update_codec_round_trip_and_rejects() -> None:
    w = np.linspace(-1, 1, 20)
    blob = encode_update(4, w, 200)
    r, w2, n = decode_update(blob)
    assert (r, n) == (4, 200) and np.array_equal(w, w2)
    for bad in (blob[:-1], blob + b"\0", b"XXXX" + blob[4:], blob[:16]):
        with pytest.raises(DecodeError):
            decode_update(bad)
    nan = encode_update(1, np.array([np.nan, 1.0]), 1)
    with pytest.raises(DecodeError, match="non-finite"):
        decode_update(nan)
