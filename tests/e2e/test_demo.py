"""``qflare demo`` end to end: a small run on each real store, and its checks can fail."""

from __future__ import annotations

import json
import logging

import pytest

from qflare.demo import Report, run_demo


def test_demo_on_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    server_log = logging.getLogger("qflare.server")
    before = server_log.level
    assert run_demo(devices=3, rounds=3, epoch_seconds=1, json_output=True) == 0
    assert server_log.level == before  # quiet during the demo only
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["store"] == "SQLite"
    assert doc["accuracy_per_round"][-1] > doc["accuracy_per_round"][0]
    assert doc["handshakes"] == 9  # 3 first handshakes, 3 at the rotation, 3 at the end
    assert doc["replay_rejected"] and doc["tamper_rejected"]


def test_demo_on_postgres(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_demo(
        devices=2, rounds=2, epoch_seconds=1, postgres_url=postgres_url, json_output=True
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["store"] == "PostgreSQL"


def test_a_failed_check_fails_the_demo() -> None:
    report = Report(devices=2, rounds=2, store="SQLite", epoch_seconds=1)
    report.accuracy = [0.5, 0.9]
    report.epochs_seen = {1, 2}
    report.keys_rotated, report.devices_on_new_key = 1, 2
    report.replay_rejected = report.tamper_rejected = True
    assert report.to_json()["ok"]
    report.devices_on_new_key = 1  # one device still pins the old key
    assert not report.to_json()["ok"]
    report.devices_on_new_key, report.tamper_rejected = 2, False
    assert not report.to_json()["ok"]


def test_bad_demo_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        run_demo(devices=0)
