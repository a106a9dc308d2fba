"""OpenTelemetry traces and metrics for facecast (OTLP over gRPC).

This package re-exports its public names, so ``from services.telemetry import X`` is the way to use it:

* :mod:`~services.telemetry.names`: span names, attribute keys, metric names and buckets (no OpenTelemetry);
* :mod:`~services.telemetry.providers`: per-process setup (providers, exporters, instruments) and Ray Serve's
  tracing hook;
* :mod:`~services.telemetry.spans`: opening spans and carrying trace context across hops.

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
down only the providers that this package installed.
"""

from __future__ import annotations

from .names import (
    ATTR_CHUNK_INDEX,
    ATTR_PRESET,
    ATTR_REASON,
    ATTR_SESSION_ID,
    ATTR_STAGE,
    ATTR_STEP,
    AUDIO_ENCODE_SPAN,
    CHUNK_INTERVAL_METRIC,
    CHUNK_SPAN,
    CHUNKS_IN_FLIGHT_METRIC,
    EGRESS_SPAN,
    FPS_BUCKETS,
    FPS_METRIC,
    INSTRUMENTATION_NAME,
    METRIC_NAMES,
    REALTIME_FACTOR_BUCKETS,
    REALTIME_FACTOR_METRIC,
    SCORE_STEP_SPAN,
    SECONDS_BUCKETS,
    SERVICE_NAME,
    SESSION_SPAN,
    SESSIONS_ACTIVE_METRIC,
    SESSIONS_REJECTED_METRIC,
    STAGE_AUDIO,
    STAGE_DURATION_METRIC,
    STAGE_EGRESS,
    STAGE_SCORE,
    STAGE_VAE,
    TTFF_METRIC,
    VAE_DECODE_SPAN,
    score_step_stage,
)
from .providers import (
    DEFAULT_METRIC_INTERVAL_S,
    FACECAST_TELEMETRY_ENV,
    SERVE_SPAN_PROCESSORS_IMPORT_PATH,
    Telemetry,
    current_telemetry,
    serve_span_processors,
    serve_tracing_env,
    setup_telemetry,
)
from .spans import context_from_grpc_metadata, extract_context, inject_context, span

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
    "DEFAULT_METRIC_INTERVAL_S",
    "FACECAST_TELEMETRY_ENV",
    "INSTRUMENTATION_NAME",
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
    "current_telemetry",
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
