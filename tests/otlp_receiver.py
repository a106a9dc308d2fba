"""A real OTLP/gRPC receiver for tests: point exporters at ``receiver.endpoint``.

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        ...  # run code that exports spans and metrics
        spans = receiver.wait_for_spans(lambda ss: any(s.name == "x" for s in ss))
        points = receiver.wait_for_metric("facecast.sessions.active")

It serves ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and
``...metrics.v1.MetricsService/Export`` on a real ``grpc.server`` bound to
``127.0.0.1:0``, and keeps everything it received, flattened into
:class:`ReceivedSpan` and :class:`ReceivedMetric` records. Each export of
cumulative metrics repeats every data point, so use
:meth:`OtlpReceiver.latest_metrics` or the last of :meth:`wait_for_metric`'s
points when you need current values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpReceiver", "ReceivedMetric", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    parent_span_id: str  # 16 hex digits, or "" for a root span
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str = ""
    kind: int = 0
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReceivedMetric:
    """One data point of one metric from one export request."""

    name: str
    kind: str  # "sum", "gauge", "histogram", "exponential_histogram" or "summary"
    attributes: dict[str, Any]
    resource: dict[str, Any]
    unit: str = ""
    value: float | None = None  # sum / gauge points
    count: int | None = None  # histogram points
    sum: float | None = None  # histogram points
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    is_monotonic: bool | None = None  # sums only
    scope: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _flatten_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=_attributes(s.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                        kind=s.kind,
                        status_code=s.status.code,
                        events=tuple(e.name for e in s.events),
                    )
                )
    return out


def _number(point: Any) -> float:
    return point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int)


def _flatten_metrics(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[ReceivedMetric]:
    out = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope.name
            for m in scope_metrics.metrics:
                kind = m.WhichOneof("data")
                common = dict(name=m.name, kind=kind, resource=resource, unit=m.unit, scope=scope)
                if kind in ("sum", "gauge"):
                    data = getattr(m, kind)
                    monotonic = data.is_monotonic if kind == "sum" else None
                    for p in data.data_points:
                        out.append(
                            ReceivedMetric(
                                attributes=_attributes(p.attributes),
                                value=_number(p),
                                is_monotonic=monotonic,
                                **common,
                            )
                        )
                elif kind == "histogram":
                    for p in m.histogram.data_points:
                        out.append(
                            ReceivedMetric(
                                attributes=_attributes(p.attributes),
                                count=p.count,
                                sum=p.sum,
                                bucket_counts=tuple(p.bucket_counts),
                                explicit_bounds=tuple(p.explicit_bounds),
                                **common,
                            )
                        )
                elif kind == "exponential_histogram":
                    for p in m.exponential_histogram.data_points:
                        out.append(
                            ReceivedMetric(
                                attributes=_attributes(p.attributes), count=p.count, sum=p.sum, **common
                            )
                        )
                elif kind == "summary":
                    for p in m.summary.data_points:
                        out.append(
                            ReceivedMetric(
                                attributes=_attributes(p.attributes), count=p.count, sum=p.sum, **common
                            )
                        )
    return out


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self._receiver._add_spans(_flatten_spans(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self._receiver._add_metrics(_flatten_metrics(request))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """A real OTLP/gRPC trace and metrics receiver on ``127.0.0.1:<free port>``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    ``endpoint`` (``"http://127.0.0.1:PORT"``) is what goes into
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``setup_telemetry(endpoint=...)``.
    """

    def __init__(self, max_workers: int = 4) -> None:
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[ReceivedMetric] = []
        self.export_requests = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            raise RuntimeError("could not bind an OTLP receiver port on 127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._started = False

    def start(self) -> OtlpReceiver:
        if not self._started:
            self._server.start()
            self._started = True
        return self

    def stop(self, grace_s: float = 0.5) -> None:
        if self._started:
            self._server.stop(grace_s).wait()
            self._started = False

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- storage ---------------------------------------------------------

    def _add_spans(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.export_requests += 1
            self._lock.notify_all()

    def _add_metrics(self, points: list[ReceivedMetric]) -> None:
        with self._lock:
            self._metrics.extend(points)
            self.export_requests += 1
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._metrics.clear()

    # --- queries ---------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def metrics(self) -> list[ReceivedMetric]:
        """Every metric data point received so far, in arrival order (repeats included)."""
        with self._lock:
            return list(self._metrics)

    def latest_metrics(self) -> dict[tuple[str, tuple[tuple[str, Any], ...]], ReceivedMetric]:
        """The last point received per (metric name, sorted attribute items)."""
        latest = {}
        for point in self.metrics():
            key = (point.name, tuple(sorted(point.attributes.items(), key=lambda kv: kv[0])))
            latest[key] = point
        return latest

    def _wait(self, get: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                items = get()
                if done(items):
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"OTLP receiver: timed out after {timeout_s} s waiting for {what}")
                self._lock.wait(remaining)

    def wait_for_spans(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(all spans so far)`` is true, then return all spans.

        Raises ``TimeoutError`` (with the span names seen) when it stays false.
        """
        try:
            return self._wait(lambda: list(self._spans), predicate, timeout_s, "spans")
        except TimeoutError as exc:
            names = sorted({s.name for s in self.spans()})
            raise TimeoutError(f"{exc}; span names received: {names}") from None

    def wait_for_metric(self, name: str, timeout_s: float = 10) -> list[ReceivedMetric]:
        """Wait until a data point of metric ``name`` arrives, then return all of its points so far."""

        def points() -> list[ReceivedMetric]:
            return [p for p in self._metrics if p.name == name]

        try:
            return self._wait(points, bool, timeout_s, f"metric {name!r}")
        except TimeoutError as exc:
            names = sorted({p.name for p in self.metrics()})
            raise TimeoutError(f"{exc}; metric names received: {names}") from None
