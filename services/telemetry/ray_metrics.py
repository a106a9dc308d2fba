"""The SRE-facing metrics mirrored into Ray's own metrics (Prometheus on every node's metrics agent), next to Serve's
`serve_*` series; the OpenTelemetry instruments (providers.py) carry the same values to the OTLP collector.

Ray is imported only when a `RayMetrics` is built (inside a Ray worker), so importing this package stays light.
"""

from __future__ import annotations

BOUNDS_S = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]


class RayMetrics:
    """TTFF, time between chunks, sessions active (this replica) and sessions rejected, as Ray metrics."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.ttff = metrics.Histogram("facecast_session_ttff_seconds", "first audio in to first video chunk out",
                                      boundaries=BOUNDS_S)
        self.chunk_interval = metrics.Histogram("facecast_chunk_interval_seconds", "time between chunks",
                                                boundaries=BOUNDS_S)
        self.sessions_active = metrics.Gauge("facecast_sessions_active", "sessions open on this ingress replica")
        self.sessions_rejected = metrics.Counter("facecast_sessions_rejected_total", "sessions refused by admission")
        self.active = 0

    def session_delta(self, delta: int) -> None:
        self.active += delta
        self.sessions_active.set(self.active)
