"""OpenTelemetry traces and metrics for facecast (OTLP over gRPC).

Call :func:`setup_telemetry` once per process: in the driver, in each Serve
replica's ``__init__`` and in each Ray actor's ``__init__``. It is idempotent,
and it returns a :class:`Telemetry` that holds the tracer, the meter and the
instruments below. Where nothing is configured, the tracer and meter are
no-op, so code can always record.

Span tree
---------
One trace per session, rooted at the client's ``traceparent`` when it sends
one::

    <client span>                     e.g. the product backend's gRPC client span
    └─ [Serve: proxy_grpc_request → route_to_replica → replica_handle_request]
       └─ facecast.session            SESSION_SPAN; session.id, preset
          └─ facecast.chunk           CHUNK_SPAN, one per chunk; session.id, chunk.index
             ├─ facecast.audio.encode AUDIO_ENCODE_SPAN
             ├─ facecast.score.step   SCORE_STEP_SPAN, one per denoising step; step
             ├─ facecast.vae.decode   VAE_DECODE_SPAN
             └─ facecast.egress       EGRESS_SPAN (publish or stream the chunk out)

The Serve spans in brackets appear only when Serve's built-in tracing is on
(see :func:`serve_tracing_env`). Use :func:`context_from_grpc_metadata` at the
ingress to seed ``facecast.session`` from the client's metadata. For every
other Ray hop (handle call or actor call), pass :func:`inject_context`'s plain
dict along with the request, and open the callee's span with
``span(NAME, carrier)``.

Metrics
-------
Durations are histograms in seconds with explicit buckets
``0.01 … 6.4`` (:data:`SECONDS_BUCKETS`):

* ``facecast.session.ttff`` (s): first audio in → first video chunk out.
* ``facecast.chunk.interval`` (s): time between consecutive chunks of one
  session (TTBC).
* ``facecast.chunk.stage.duration`` (s), attribute ``stage``, one of
  ``audio``, ``score_step_<k>`` (see :func:`score_step_stage`), ``score``,
  ``vae`` or ``egress``.
* ``facecast.session.fps`` (``{frame}/s``), with :data:`FPS_BUCKETS`.
* ``facecast.chunk.realtime_factor`` (``1``): generation time / chunk
  duration, where < 1 means faster than real time. Uses
  :data:`REALTIME_FACTOR_BUCKETS`.
* ``facecast.sessions.active`` (up-down counter).
* ``facecast.chunks.in_flight`` (up-down counter).
* ``facecast.sessions.rejected`` (counter), attribute ``reason``.

Keep metric attributes low-cardinality. Never put ``session.id`` on a
metric; it belongs on spans.

Providers
---------
:func:`setup_telemetry` installs the global tracer and meter providers only
where none is set yet. If another component set one first, it is reused as
is: nothing is replaced, and no exporters are added to it. Ray Serve's
built-in tracing, for example, sets the tracer provider in each replica
before the deployment's ``__init__`` runs. :meth:`Telemetry.shutdown` shuts
down only the providers that this module installed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, Meter, UpDownCounter
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import Span, Tracer

__all__ = [
    "ATTR_CHUNK_INDEX",
    "ATTR_PRESET",
    "ATTR_REASON",
    "ATTR_SESSION_ID",
    "ATTR_STAGE",
    "ATTR_STEP",
    "AUDIO_ENCODE_SPAN",
    "CHUNKS_IN_FLIGHT_METRIC",
    "CHUNK_INTERVAL_METRIC",
    "FPS_METRIC",
    "METRIC_NAMES",
    "REALTIME_FACTOR_METRIC",
    "SESSIONS_ACTIVE_METRIC",
    "SESSIONS_REJECTED_METRIC",
    "STAGE_DURATION_METRIC",
    "TTFF_METRIC",
    "CHUNK_SPAN",
    "EGRESS_SPAN",
    "FPS_BUCKETS",
    "REALTIME_FACTOR_BUCKETS",
    "SCORE_STEP_SPAN",
    "SECONDS_BUCKETS",
    "SERVE_SPAN_PROCESSORS_IMPORT_PATH",
    "SERVICE_NAME",
    "SESSION_SPAN",
    "STAGE_AUDIO",
    "STAGE_EGRESS",
    "STAGE_SCORE",
    "STAGE_VAE",
    "Telemetry",
    "VAE_DECODE_SPAN",
    "context_from_grpc_metadata",
    "extract_context",
    "inject_context",
    "score_step_stage",
    "serve_span_processors",
    "serve_tracing_env",
    "setup_telemetry",
    "span",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = "facecast"
INSTRUMENTATION_NAME = "facecast"

# --- span names -------------------------------------------------------------
SESSION_SPAN = "facecast.session"
CHUNK_SPAN = "facecast.chunk"
AUDIO_ENCODE_SPAN = "facecast.audio.encode"
SCORE_STEP_SPAN = "facecast.score.step"
VAE_DECODE_SPAN = "facecast.vae.decode"
EGRESS_SPAN = "facecast.egress"

# --- span attribute keys ----------------------------------------------------
ATTR_SESSION_ID = "session.id"
ATTR_PRESET = "preset"
ATTR_CHUNK_INDEX = "chunk.index"
ATTR_STEP = "step"

# --- metric names and attribute values --------------------------------------
TTFF_METRIC = "facecast.session.ttff"
CHUNK_INTERVAL_METRIC = "facecast.chunk.interval"
STAGE_DURATION_METRIC = "facecast.chunk.stage.duration"
FPS_METRIC = "facecast.session.fps"
REALTIME_FACTOR_METRIC = "facecast.chunk.realtime_factor"
SESSIONS_ACTIVE_METRIC = "facecast.sessions.active"
CHUNKS_IN_FLIGHT_METRIC = "facecast.chunks.in_flight"
SESSIONS_REJECTED_METRIC = "facecast.sessions.rejected"
METRIC_NAMES = (
    TTFF_METRIC,
    CHUNK_INTERVAL_METRIC,
    STAGE_DURATION_METRIC,
    FPS_METRIC,
    REALTIME_FACTOR_METRIC,
    SESSIONS_ACTIVE_METRIC,
    CHUNKS_IN_FLIGHT_METRIC,
    SESSIONS_REJECTED_METRIC,
)

ATTR_STAGE = "stage"
ATTR_REASON = "reason"
STAGE_AUDIO = "audio"
STAGE_SCORE = "score"
STAGE_VAE = "vae"
STAGE_EGRESS = "egress"

SECONDS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
# The seconds buckets would put every fps / realtime-factor value in one bucket,
# so those two get buckets of their own.
FPS_BUCKETS = (1.0, 5.0, 10.0, 15.0, 20.0, 24.0, 25.0, 30.0, 50.0, 60.0)
REALTIME_FACTOR_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

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


def score_step_stage(k: int) -> str:
    """The ``stage`` attribute value for denoising step ``k``: ``score_step_<k>``."""
    return f"score_step_{int(k)}"


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


# --- context propagation ----------------------------------------------------


def inject_context(context: Context | None = None) -> dict[str, str]:
    """The current (or given) trace context as a plain, picklable dict.

    With the default propagators it holds W3C ``traceparent``/``tracestate``
    (and ``baggage`` when there is some). Pass it through Serve handle calls
    and Ray actor calls as a normal argument or a request field. It is ``{}``
    when there is no active span.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    """The context a carrier from :func:`inject_context` stands for.

    With no carrier, or one without a valid ``traceparent``, this is an
    empty context, so a span started in it is a new root.
    """
    if not carrier:
        return Context()
    return propagate.extract(dict(carrier))


def context_from_grpc_metadata(metadata: Sequence[tuple[str, str]] | None) -> Context:
    """The client's trace context from gRPC invocation metadata.

    Takes ``(key, value)`` pairs such as ``RayServegRPCContext.invocation_metadata()``
    or ``grpc.ServicerContext.invocation_metadata()``. Keys are matched
    case-insensitively, binary (``-bin``) entries are skipped, and the first
    value of a repeated key wins.

    Behind Serve with built-in tracing on, the current context is already
    Serve's ``replica_handle_request`` span, which is a child of this same
    client span. Starting ``facecast.session`` in the current context (no
    carrier) then keeps Serve's spans in the chain. This function is for the
    case where Serve's tracing is off.
    """
    carrier: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        key = key.lower()
        if key.endswith("-bin") or not isinstance(value, str) or key in carrier:
            continue
        carrier[key] = value
    return extract_context(carrier)


@contextmanager
def span(
    name: str, carrier: Mapping[str, str] | Context | None = None, **attributes: Any
) -> Iterator[Span]:
    """Start ``name`` as the current span and yield it.

    The parent is:

    * ``carrier`` itself, when it is a :class:`Context` holding a valid
      span (e.g. from :func:`context_from_grpc_metadata`);
    * the context in ``carrier``, when it is a mapping holding a valid
      ``traceparent`` (from :func:`inject_context`);
    * otherwise the current context. This covers no carrier and a carrier
      of either kind with no valid span. For example, a client that sent no
      ``traceparent`` leaves the span under Serve's replica span, if there is
      one, or makes it a new root.

    Attributes whose value is None are dropped. An exception leaving the
    block is recorded on the span, which is marked as an error, and then
    re-raised.
    """
    if isinstance(carrier, Context):
        valid = trace.get_current_span(carrier).get_span_context().is_valid
        parent: Context | None = carrier if valid else None
    elif carrier:
        # Extract over the current context: a valid traceparent replaces the
        # current span, and an empty or invalid one leaves it in place.
        parent = propagate.extract(dict(carrier), context=otel_context.get_current())
    else:
        parent = None
    attrs = {k: v for k, v in attributes.items() if v is not None}
    tracer = _telemetry.tracer if _telemetry is not None else trace.get_tracer(INSTRUMENTATION_NAME)
    with tracer.start_as_current_span(
        name, context=parent, attributes=attrs, record_exception=True, set_status_on_exception=True
    ) as current:
        yield current


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
