"""Setting up OpenTelemetry for one process: the providers, the OTLP/console exporters, facecast's metric
instruments, and the exporter hook that Ray Serve's built-in tracing loads.

What lives here
---------------
* :func:`setup_telemetry`, idempotent per process, returning a :class:`Telemetry` (tracer, meter, instruments);
  :func:`current_telemetry` reads the process's one instance (None before setup).
* :func:`serve_span_processors` and :func:`serve_tracing_env`: what Serve's proxies and replicas need to trace
  the proxy -> replica -> handle chain.

Where a global provider is already set, it is reused as it is; :meth:`Telemetry.shutdown` shuts down only the
providers installed here.

What this file does not know
----------------------------
Spans and trace-context propagation (:mod:`services.telemetry.spans`), or what the deployments record.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import Counter, Histogram, Meter, UpDownCounter
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import Tracer

from .names import (
    CHUNK_INTERVAL_METRIC,
    CHUNKS_IN_FLIGHT_METRIC,
    FPS_BUCKETS,
    FPS_METRIC,
    INSTRUMENTATION_NAME,
    REALTIME_FACTOR_BUCKETS,
    REALTIME_FACTOR_METRIC,
    SECONDS_BUCKETS,
    SERVICE_NAME,
    SESSIONS_ACTIVE_METRIC,
    SESSIONS_REJECTED_METRIC,
    STAGE_DURATION_METRIC,
    TTFF_METRIC,
)

__all__ = [
    "DEFAULT_METRIC_INTERVAL_S",
    "FACECAST_TELEMETRY_ENV",
    "SERVE_SPAN_PROCESSORS_IMPORT_PATH",
    "Telemetry",
    "current_telemetry",
    "serve_span_processors",
    "serve_tracing_env",
    "setup_telemetry",
]

logger = logging.getLogger(__name__)

DEFAULT_METRIC_INTERVAL_S = 10.0

# --- environment ------------------------------------------------------------
FACECAST_TELEMETRY_ENV = "FACECAST_TELEMETRY"  # "console" or "off"; unset/other = auto
SERVE_SPAN_PROCESSORS_IMPORT_PATH = "services.telemetry:serve_span_processors"
_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
_INSECURE = "OTEL_EXPORTER_OTLP_INSECURE"
_TRACES_INSECURE = "OTEL_EXPORTER_OTLP_TRACES_INSECURE"
_METRICS_INSECURE = "OTEL_EXPORTER_OTLP_METRICS_INSECURE"
_METRIC_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"  # milliseconds, per the OTel spec


class Telemetry:
    """The tracer, the meter and facecast's instruments for this process.

    Build it with :func:`setup_telemetry`, not directly. ``mode`` is
    ``"otlp"``, ``"console"`` or ``"noop"``. ``owns_tracer_provider`` and
    ``owns_meter_provider`` say whether this module installed the global
    providers; if it did not, they belong to someone else and are left alone.
    """

    def __init__(
        self,
        *,
        service_name: str,
        mode: str,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self.service_name = service_name
        self.mode = mode
        self._tracer_provider = tracer_provider  # set only when we own it
        self._meter_provider = meter_provider  # set only when we own it
        self._shut_down = False

        # The global API objects: they go to our providers when we installed
        # them, to someone else's when those were there first, and are no-op
        # proxies (which start working once any provider is set) otherwise.
        self.tracer: Tracer = trace.get_tracer(INSTRUMENTATION_NAME)
        self.meter: Meter = metrics.get_meter(INSTRUMENTATION_NAME)

        m = self.meter
        self.ttff: Histogram = m.create_histogram(
            TTFF_METRIC,
            unit="s",
            description="Session time to first frame: first audio in -> first video chunk out",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.chunk_interval: Histogram = m.create_histogram(
            CHUNK_INTERVAL_METRIC,
            unit="s",
            description="Time between consecutive video chunks of one session (TTBC)",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.stage_duration: Histogram = m.create_histogram(
            STAGE_DURATION_METRIC,
            unit="s",
            description="Duration of one pipeline stage of one chunk; attribute stage",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.fps: Histogram = m.create_histogram(
            FPS_METRIC,
            unit="{frame}/s",
            description="Frames per second delivered to a session",
            explicit_bucket_boundaries_advisory=FPS_BUCKETS,
        )
        self.realtime_factor: Histogram = m.create_histogram(
            REALTIME_FACTOR_METRIC,
            unit="1",
            description="Chunk generation time / chunk duration (<1 is faster than real time)",
            explicit_bucket_boundaries_advisory=REALTIME_FACTOR_BUCKETS,
        )
        self.sessions_active: UpDownCounter = m.create_up_down_counter(
            SESSIONS_ACTIVE_METRIC, unit="{session}", description="Sessions open now"
        )
        self.chunks_in_flight: UpDownCounter = m.create_up_down_counter(
            CHUNKS_IN_FLIGHT_METRIC, unit="{chunk}", description="Chunks being generated now"
        )
        self.sessions_rejected: Counter = m.create_counter(
            SESSIONS_REJECTED_METRIC,
            unit="{session}",
            description="Sessions refused at admission; attribute reason",
        )

    @property
    def owns_tracer_provider(self) -> bool:
        return self._tracer_provider is not None

    @property
    def owns_meter_provider(self) -> bool:
        return self._meter_provider is not None

    def force_flush(self, timeout_s: float = 10) -> bool:
        """Export buffered spans and collect/export metrics now.

        Flushes the global providers even when they belong to someone else
        (flushing is harmless). Returns True when every flush finished in time.
        """
        millis = max(1, int(timeout_s * 1000))
        ok = True
        for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
            flush = getattr(provider, "force_flush", None)
            if flush is None:
                continue
            try:
                result = flush(millis)
            except Exception:  # an exporter failing must not break the caller
                logger.exception("telemetry flush failed")
                ok = False
                continue
            ok = ok and result is not False
        return ok

    def shutdown(self) -> None:
        """Flush and shut down the providers this module installed (not anyone else's).

        This is final for the process: OTel lets a global provider be set only
        once, so a later :func:`setup_telemetry` returns this same, now inert,
        object. Both providers also shut down by themselves at interpreter exit.
        """
        if self._shut_down:
            return
        self._shut_down = True
        for provider in (self._tracer_provider, self._meter_provider):
            if provider is None:
                continue
            try:
                provider.shutdown()
            except Exception:
                logger.exception("telemetry shutdown failed")


_lock = threading.Lock()
_telemetry: Telemetry | None = None


def current_telemetry() -> Telemetry | None:
    """This process's :class:`Telemetry` once :func:`setup_telemetry` has run, else None."""
    return _telemetry


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _insecure_arg(insecure: bool, explicit_endpoint: bool, signal_env: str) -> bool | None:
    """What to pass as the exporter's ``insecure``.

    ``insecure`` applies to an endpoint passed in code. For an endpoint from
    the environment, an explicit ``OTEL_EXPORTER_OTLP_[SIGNAL_]INSECURE`` wins
    (None lets the exporter read it). An ``https://`` endpoint always uses TLS
    (the exporter's own rule).
    """
    if not explicit_endpoint and (signal_env in os.environ or _INSECURE in os.environ):
        return None
    return insecure


def _span_exporter(endpoint: str | None, insecure: bool):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=endpoint, insecure=_insecure_arg(insecure, endpoint is not None, _TRACES_INSECURE)
    )


def _metric_exporter(endpoint: str | None, insecure: bool):
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(
        endpoint=endpoint, insecure=_insecure_arg(insecure, endpoint is not None, _METRICS_INSECURE)
    )


def _traces_endpoint_configured() -> bool:
    return bool(os.environ.get(_ENDPOINT) or os.environ.get(_TRACES_ENDPOINT))


def _metrics_endpoint_configured() -> bool:
    return bool(os.environ.get(_ENDPOINT) or os.environ.get(_METRICS_ENDPOINT))


def _metric_interval_ms(metric_interval_s: float | None) -> float:
    if metric_interval_s is not None:
        if metric_interval_s <= 0:
            raise ValueError(f"metric_interval_s must be > 0, got {metric_interval_s}")
        return metric_interval_s * 1000.0
    raw = os.environ.get(_METRIC_INTERVAL, "").strip()
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
        logger.warning("ignoring invalid %s=%r", _METRIC_INTERVAL, raw)
    return DEFAULT_METRIC_INTERVAL_S * 1000.0


def _tracer_provider_is_set() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _meter_provider_is_set() -> bool:
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - private name moved
        return type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"
    return not isinstance(metrics.get_meter_provider(), _ProxyMeterProvider)


def setup_telemetry(
    service_name: str = SERVICE_NAME,
    *,
    endpoint: str | None = None,
    insecure: bool = True,
    metric_interval_s: float | None = None,
) -> Telemetry:
    """Set up tracing and metrics for this process and return its :class:`Telemetry`.

    Idempotent: the first call decides, and later calls return the same
    object whatever their arguments.

    The mode is picked in this order:

    1. ``OTEL_SDK_DISABLED=true`` or ``FACECAST_TELEMETRY=off``: no-op.
    2. ``endpoint`` given (e.g. ``"http://collector:4317"``): OTLP/gRPC
       traces and metrics to it. ``insecure`` means plaintext, but an
       ``https://`` endpoint always uses TLS.
    3. ``FACECAST_TELEMETRY=console``: spans and metrics go to stdout.
    4. ``OTEL_EXPORTER_OTLP_ENDPOINT`` set: OTLP/gRPC for both signals.
       ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``..._METRICS_ENDPOINT``
       alone turns on just that signal. The exporters read the other
       ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, compression,
       certificates) themselves. Only the gRPC protocol is supported.
    5. Otherwise: no-op.

    The resource is ``service.name=service_name``, merged over
    ``OTEL_RESOURCE_ATTRIBUTES``; the argument wins over ``OTEL_SERVICE_NAME``.
    Spans go through a ``BatchSpanProcessor`` (``OTEL_BSP_*`` apply), and
    the sampler is the SDK default (``OTEL_TRACES_SAMPLER``, else
    parent-based always-on). Metrics go through a
    ``PeriodicExportingMetricReader`` that exports every
    ``metric_interval_s``, else ``OTEL_METRIC_EXPORT_INTERVAL`` ms, else 10 s.

    A global provider that is already set (by Serve's tracing, Ray's tracing
    hook, or the application) is never replaced: it is used as it is.
    """
    global _telemetry
    with _lock:
        if _telemetry is not None:
            return _telemetry
        _telemetry = _build(service_name, endpoint, insecure, metric_interval_s)
        return _telemetry


def _build(
    service_name: str, endpoint: str | None, insecure: bool, metric_interval_s: float | None
) -> Telemetry:
    mode_env = os.environ.get(FACECAST_TELEMETRY_ENV, "").strip().lower()
    if _env_true("OTEL_SDK_DISABLED") or mode_env in ("off", "none", "disabled"):
        return Telemetry(service_name=service_name, mode="noop")

    if endpoint is not None:
        mode, want_traces, want_metrics = "otlp", True, True
    elif mode_env == "console":
        mode, want_traces, want_metrics = "console", True, True
    else:
        want_traces = _traces_endpoint_configured()
        want_metrics = _metrics_endpoint_configured()
        mode = "otlp" if (want_traces or want_metrics) else "noop"
    if mode == "noop":
        return Telemetry(service_name=service_name, mode="noop")

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip().lower()
    if mode == "otlp" and protocol not in ("", "grpc"):
        logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting over gRPC", protocol)

    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({SERVICE_NAME_KEY: service_name})
    tracer_provider = None
    meter_provider = None

    if want_traces:
        if _tracer_provider_is_set():
            logger.info("a tracer provider is already set; facecast spans use it as is")
        else:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            candidate = TracerProvider(resource=resource)
            exporter = ConsoleSpanExporter() if mode == "console" else _span_exporter(endpoint, insecure)
            candidate.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(candidate)
            if trace.get_tracer_provider() is candidate:
                tracer_provider = candidate
            else:  # lost a race with another setter; theirs stays
                candidate.shutdown()

    if want_metrics:
        if _meter_provider_is_set():
            logger.info("a meter provider is already set; facecast metrics use it as is")
        else:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import (
                ConsoleMetricExporter,
                PeriodicExportingMetricReader,
            )

            exporter = ConsoleMetricExporter() if mode == "console" else _metric_exporter(endpoint, insecure)
            reader = PeriodicExportingMetricReader(
                exporter, export_interval_millis=_metric_interval_ms(metric_interval_s)
            )
            candidate = MeterProvider(resource=resource, metric_readers=[reader])
            metrics.set_meter_provider(candidate)
            if metrics.get_meter_provider() is candidate:
                meter_provider = candidate
            else:
                candidate.shutdown()

    return Telemetry(
        service_name=service_name,
        mode=mode,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )


# --- Ray Serve built-in tracing -----------------------------------------------


def serve_span_processors() -> list[SpanProcessor]:
    """Span processors for Ray Serve's built-in tracing.

    Serve loads this through ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` (see
    :func:`serve_tracing_env`) in every proxy and replica. It returns
    ``[BatchSpanProcessor(OTLPSpanExporter())]`` when
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT`` is set, and
    ``[]`` otherwise.

    It also returns ``[]`` when this process already runs a tracer provider
    from :func:`setup_telemetry` that exports by itself. That happens when
    ``setup_telemetry()`` ran at import time of the deployment module, before
    Serve set up tracing. Serve's own ``set_tracer_provider`` is then refused
    and its processors are added to our provider, so returning one here
    would export every span twice.
    """
    if not _traces_endpoint_configured():
        return []
    if _telemetry is not None and _telemetry.owns_tracer_provider:
        return []
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(_span_exporter(None, insecure=True))]


def serve_tracing_env() -> dict[str, str]:
    """Env vars to set on every Ray node (e.g. the KubeRay pod env) for Serve tracing.

    Ray 2.60 does not pass ``serve.start(tracing_config=...)`` to the
    proxies. Only these env vars, present when the proxy and replica
    processes start, make Serve trace the whole
    proxy → replica → handle chain, linked to the client's ``traceparent``.
    A Serve app's ``runtime_env`` reaches its replicas but not the proxies.

    The result holds:

    * ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` = this module's
      :func:`serve_span_processors`;
    * ``RAY_SERVE_TRACING_SAMPLING_RATIO=1.0`` (Serve's default is 0.01);
    * every ``OTEL_*`` variable set in this process, plus
      ``FACECAST_TELEMETRY`` when set;
    * ``OTEL_SERVICE_NAME=facecast`` unless set, because Serve's tracer
      provider takes its resource from the environment alone.
    """
    env = {
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": SERVE_SPAN_PROCESSORS_IMPORT_PATH,
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "1.0",
    }
    for key, value in os.environ.items():
        if key.startswith("OTEL_") or key == FACECAST_TELEMETRY_ENV:
            env[key] = value
    env.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    return env
