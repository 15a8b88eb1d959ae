"""Prometheus metrics of the server, on a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "qflare_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.handshakes = Counter(
            "qflare_handshakes", "Handshake outcomes", ["outcome"], registry=self.registry
        )
        self.handshake_seconds = Histogram(
            "qflare_handshake_step_seconds",
            "Server time per handshake step",
            ["step"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.records = Counter(
            "qflare_records",
            "Records by purpose and outcome",
            ["purpose", "outcome"],
            registry=self.registry,
        )
        self.record_bytes = Counter(
            "qflare_record_bytes", "Plaintext bytes opened", registry=self.registry
        )
        self.enrollments = Counter(
            "qflare_enrollments", "Enrollment outcomes", ["outcome"], registry=self.registry
        )
        self.security_events = Counter(
            "qflare_security_events",
            "Security events by type and severity",
            ["type", "severity"],
            registry=self.registry,
        )
        self.active_sessions = Gauge(
            "qflare_sessions_cached",
            "Sessions held in this replica's memory",
            registry=self.registry,
        )
        self.key_rotations = Counter(
            "qflare_key_rotations", "Server key rotations", ["purpose"], registry=self.registry
        )
