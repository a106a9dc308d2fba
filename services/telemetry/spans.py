"""Opening facecast's spans and carrying trace context across process boundaries (gRPC metadata, Serve handle
calls, Ray actor calls).

What lives here
---------------
* :func:`span`: start a named span as the current one, parented on a carrier, a context or the current span.
* :func:`inject_context` / :func:`extract_context`: the trace context as a plain, picklable dict and back.
* :func:`context_from_grpc_metadata`: the client's ``traceparent`` from gRPC invocation metadata.

Spans go to the tracer of :func:`~services.telemetry.providers.setup_telemetry` when it has run, else to the
global API's tracer (a no-op until some provider is set), so code can always record.

What this file does not know
----------------------------
Providers and exporters (:mod:`services.telemetry.providers`), metrics, or which span names exist
(:mod:`services.telemetry.names`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from .names import INSTRUMENTATION_NAME
from .providers import current_telemetry

__all__ = ["context_from_grpc_metadata", "extract_context", "inject_context", "span"]


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
    telemetry = current_telemetry()
    tracer = telemetry.tracer if telemetry is not None else trace.get_tracer(INSTRUMENTATION_NAME)
    with tracer.start_as_current_span(
        name, context=parent, attributes=attrs, record_exception=True, set_status_on_exception=True
    ) as current:
        yield current
