"""Tests for services.telemetry against a real OTLP/gRPC receiver.

Global tracer and meter providers are per process and can be set only once,
so every test that calls ``setup_telemetry`` runs it in a subprocess or a Ray
worker. The pytest process itself never installs a global provider.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services import telemetry as tm
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("OTEL_") or k.startswith("RAY_SERVE_TRACING") or k == "FACECAST_TELEMETRY")
    }
    env.update(extra)
    return env


def _run_script(script: str, env: dict[str, str], timeout: float = 25) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


# --- end to end in a subprocess ------------------------------------------------

PIPELINE_SCRIPT = """
import json, os
from services import telemetry as t

tel = t.setup_telemetry(endpoint=os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"], metric_interval_s=0.2)
assert t.setup_telemetry() is tel  # idempotent
ctx = t.context_from_grpc_metadata(
    [("user-agent", "grpc-python"), ("TraceParent", os.environ["CLIENT_TRACEPARENT"]), ("x-bin", b"\\x00")]
)
with t.span(t.SESSION_SPAN, ctx, **{"session.id": "s-1", "preset": "fast"}):
    tel.sessions_active.add(1)
    for index in range(2):
        with t.span(t.CHUNK_SPAN, **{"session.id": "s-1", "chunk.index": index}):
            tel.chunks_in_flight.add(1)
            with t.span(t.AUDIO_ENCODE_SPAN):
                tel.stage_duration.record(0.015, {"stage": t.STAGE_AUDIO})
            for k in range(2):
                with t.span(t.SCORE_STEP_SPAN, step=k, ignored=None):
                    tel.stage_duration.record(0.03, {"stage": t.score_step_stage(k)})
            tel.stage_duration.record(0.06, {"stage": t.STAGE_SCORE})
            with t.span(t.VAE_DECODE_SPAN):
                tel.stage_duration.record(0.12, {"stage": t.STAGE_VAE})
            try:
                with t.span(t.EGRESS_SPAN):
                    tel.stage_duration.record(0.005, {"stage": t.STAGE_EGRESS})
                    if index == 1:
                        raise RuntimeError("publish failed")
            except RuntimeError:
                pass
            tel.chunks_in_flight.add(-1)
    tel.ttff.record(0.35)
    tel.chunk_interval.record(0.5)
    tel.fps.record(25.0)
    tel.realtime_factor.record(0.8)
    tel.sessions_rejected.add(1, {"reason": "capacity"})
flushed = tel.force_flush(5)
print(json.dumps({
    "mode": tel.mode,
    "flushed": flushed,
    "owns": [tel.owns_tracer_provider, tel.owns_meter_provider],
    "serve_processors": len(t.serve_span_processors()),
}))
"""


@pytest.fixture(scope="module")
def pipeline_run():
    """One subprocess run of a whole session, exported to a real receiver."""
    traceparent, trace_id, client_span_id = _new_traceparent()
    with OtlpReceiver() as receiver:
        env = _clean_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,k8s.pod.name=pod-0",
            CLIENT_TRACEPARENT=traceparent,
        )
        result = _run_script(PIPELINE_SCRIPT, env)
        # force_flush returned, so the exports are already done; the waits only guard against slow delivery.
        spans = receiver.wait_for_spans(lambda ss: len(ss) >= 13, timeout_s=5)
        for name in tm.METRIC_NAMES:
            receiver.wait_for_metric(name, timeout_s=5)
        latest = receiver.latest_metrics()
    return {
        "result": result,
        "trace_id": trace_id,
        "client_span_id": client_span_id,
        "spans": spans,
        "latest": latest,
    }


@pytest.mark.integration
def test_pipeline_setup_reports_otlp_mode(pipeline_run):
    result = pipeline_run["result"]
    assert result["mode"] == "otlp"
    assert result["flushed"] is True
    assert result["owns"] == [True, True]
    # our provider exports by itself, so Serve must not get a second exporter
    assert result["serve_processors"] == 0


@pytest.mark.integration
def test_span_tree_links_to_client_traceparent(pipeline_run):
    spans = pipeline_run["spans"]
    by_name = _by_name(spans)
    assert {s.trace_id for s in spans} == {pipeline_run["trace_id"]}

    (session,) = by_name[tm.SESSION_SPAN]
    assert session.parent_span_id == pipeline_run["client_span_id"]
    assert session.attributes == {"session.id": "s-1", "preset": "fast"}
    assert session.resource["service.name"] == "facecast"
    assert session.resource["deployment.environment"] == "test"
    assert session.resource["k8s.pod.name"] == "pod-0"
    assert session.scope == "facecast"

    chunks = sorted(by_name[tm.CHUNK_SPAN], key=lambda s: s.attributes["chunk.index"])
    assert [c.attributes for c in chunks] == [
        {"session.id": "s-1", "chunk.index": 0},
        {"session.id": "s-1", "chunk.index": 1},
    ]
    assert all(c.parent_span_id == session.span_id for c in chunks)

    chunk_ids = {c.span_id for c in chunks}
    for name in (tm.AUDIO_ENCODE_SPAN, tm.SCORE_STEP_SPAN, tm.VAE_DECODE_SPAN, tm.EGRESS_SPAN):
        children = by_name[name]
        assert {c.parent_span_id for c in children} == chunk_ids, name
    assert len(by_name[tm.SCORE_STEP_SPAN]) == 4
    assert sorted(s.attributes["step"] for s in by_name[tm.SCORE_STEP_SPAN]) == [0, 0, 1, 1]
    assert all("ignored" not in s.attributes for s in by_name[tm.SCORE_STEP_SPAN])


@pytest.mark.integration
def test_span_records_exceptions(pipeline_run):
    by_name = _by_name(pipeline_run["spans"])
    chunk1 = next(c for c in by_name[tm.CHUNK_SPAN] if c.attributes["chunk.index"] == 1)
    failed = [s for s in by_name[tm.EGRESS_SPAN] if s.parent_span_id == chunk1.span_id]
    ok = [s for s in by_name[tm.EGRESS_SPAN] if s.parent_span_id != chunk1.span_id]
    assert failed[0].status_code == 2  # STATUS_CODE_ERROR
    assert "exception" in failed[0].events
    assert ok[0].status_code == 0 and ok[0].events == ()
    assert chunk1.status_code == 0  # the exception was handled inside the chunk


@pytest.mark.integration
def test_every_metric_arrives_with_its_attributes(pipeline_run):
    latest = pipeline_run["latest"]
    names = {name for name, _ in latest}
    assert names == set(tm.METRIC_NAMES)

    def point(name, **attrs):
        return latest[(name, tuple(sorted(attrs.items())))]

    seconds = tuple(tm.SECONDS_BUCKETS)
    for name, total in ((tm.TTFF_METRIC, 0.35), (tm.CHUNK_INTERVAL_METRIC, 0.5)):
        p = point(name)
        assert (p.kind, p.unit, p.count, p.explicit_bounds) == ("histogram", "s", 1, seconds)
        assert p.sum == pytest.approx(total)

    stages = {dict(attrs)["stage"] for name, attrs in latest if name == tm.STAGE_DURATION_METRIC}
    assert stages == {"audio", "score_step_0", "score_step_1", "score", "vae", "egress"}
    for stage in stages:
        p = point(tm.STAGE_DURATION_METRIC, stage=stage)
        assert (p.kind, p.unit, p.explicit_bounds) == ("histogram", "s", seconds)
        assert p.count == 2, stage  # two chunks
    assert point(tm.STAGE_DURATION_METRIC, stage="vae").sum == pytest.approx(0.24)

    fps = point(tm.FPS_METRIC)
    assert (fps.kind, fps.unit, fps.count, fps.sum) == ("histogram", "{frame}/s", 1, 25.0)
    assert fps.explicit_bounds == tuple(tm.FPS_BUCKETS)
    rtf = point(tm.REALTIME_FACTOR_METRIC)
    assert (rtf.kind, rtf.unit, rtf.count) == ("histogram", "1", 1)
    assert rtf.sum == pytest.approx(0.8)

    active = point(tm.SESSIONS_ACTIVE_METRIC)
    assert (active.kind, active.is_monotonic, active.value) == ("sum", False, 1)
    in_flight = point(tm.CHUNKS_IN_FLIGHT_METRIC)
    assert (in_flight.kind, in_flight.is_monotonic, in_flight.value) == ("sum", False, 0)
    rejected = point(tm.SESSIONS_REJECTED_METRIC, reason="capacity")
    assert (rejected.kind, rejected.is_monotonic, rejected.value) == ("sum", True, 1)
    assert rejected.resource["service.name"] == "facecast"


# --- provider ownership and no-op mode -------------------------------------------

FOREIGN_PROVIDER_SCRIPT = """
import json, os
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from services import telemetry as t

theirs = TracerProvider()
trace.set_tracer_provider(theirs)
tel = t.setup_telemetry(endpoint=os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"], metric_interval_s=0.2)
with t.span(t.SESSION_SPAN) as s:
    recording = s.is_recording()
tel.sessions_active.add(1)
tel.force_flush(5)
tel.shutdown()
print(json.dumps({
    "still_theirs": trace.get_tracer_provider() is theirs,
    "owns": [tel.owns_tracer_provider, tel.owns_meter_provider],
    "recording": recording,
    "serve_processors": len(t.serve_span_processors()),
}))
"""


@pytest.mark.integration
def test_existing_tracer_provider_is_reused_not_replaced():
    with OtlpReceiver() as receiver:
        env = _clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        result = _run_script(FOREIGN_PROVIDER_SCRIPT, env)
        receiver.wait_for_metric(tm.SESSIONS_ACTIVE_METRIC, timeout_s=5)
        # their provider has no exporter, so our span went nowhere
        assert [s for s in receiver.spans() if s.name == tm.SESSION_SPAN] == []
    assert result == {
        "still_theirs": True,
        "owns": [False, True],
        "recording": True,
        "serve_processors": 1,  # we own no tracer provider here, so Serve would need its own
    }


NOOP_SCRIPT = """
import json, os
from opentelemetry import trace
from services import telemetry as t

tel = t.setup_telemetry()
ctx = t.context_from_grpc_metadata([("traceparent", os.environ["CLIENT_TRACEPARENT"])])
with t.span(t.SESSION_SPAN, ctx, **{"session.id": "s"}) as s:
    carrier = t.inject_context()
    recording = s.is_recording()
tel.ttff.record(0.1)
tel.sessions_rejected.add(1, {"reason": "capacity"})
print(json.dumps({
    "mode": tel.mode,
    "owns": [tel.owns_tracer_provider, tel.owns_meter_provider],
    "proxy": isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider),
    "recording": recording,
    "carrier": carrier,
    "flushed": tel.force_flush(1),
}))
"""


def test_noop_without_endpoint_still_propagates_client_context():
    traceparent, _, _ = _new_traceparent()
    result = _run_script(NOOP_SCRIPT, _clean_env(CLIENT_TRACEPARENT=traceparent))
    assert result["mode"] == "noop"
    assert result["owns"] == [False, False]
    assert result["proxy"] is True  # no global provider installed
    assert result["recording"] is False
    # a no-op service passes the client's context through unchanged
    assert result["carrier"]["traceparent"] == traceparent
    assert result["flushed"] is True


# --- propagation helpers (no global providers touched) -----------------------------


def test_inject_extract_round_trip_survives_pickling():
    tracer = TracerProvider().get_tracer("test")  # local provider: nothing global is set
    with tracer.start_as_current_span("caller") as caller:
        carrier = tm.inject_context()
    caller_ctx = caller.get_span_context()
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{caller_ctx.trace_id:032x}", f"{caller_ctx.span_id:016x}")
    # sampled; SDK 1.45 also sets the W3C level-2 "random" flag, so this is "03", not "01"
    assert int(flags, 16) & 0x01

    shipped = pickle.loads(pickle.dumps(carrier))  # what a Ray hop does to it
    assert isinstance(shipped, dict) and shipped == carrier

    with tracer.start_as_current_span("callee", context=tm.extract_context(shipped)) as callee:
        pass
    assert callee.get_span_context().trace_id == caller_ctx.trace_id
    assert callee.parent.span_id == caller_ctx.span_id


def test_inject_given_context_and_empty_cases():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("a") as a:
        pass
    from opentelemetry.trace import set_span_in_context

    carrier = tm.inject_context(set_span_in_context(a))
    assert carrier["traceparent"].split("-")[2] == f"{a.get_span_context().span_id:016x}"
    assert tm.inject_context() == {}  # no active span
    assert tm.extract_context(None) == {} and tm.extract_context({}) == {}
    assert tm.extract_context({"traceparent": "garbage"}) == {}


def test_context_from_grpc_metadata_takes_first_text_traceparent():
    first, trace_id, span_id = _new_traceparent()
    second, _, _ = _new_traceparent()
    ctx = tm.context_from_grpc_metadata(
        [("traceparent-bin", b"\x01"), ("Traceparent", first), ("traceparent", second), ("tracestate", "k=v")]
    )
    from opentelemetry.trace import get_current_span

    span_ctx = get_current_span(ctx).get_span_context()
    assert (f"{span_ctx.trace_id:032x}", f"{span_ctx.span_id:016x}") == (trace_id, span_id)
    assert span_ctx.is_remote and span_ctx.trace_state.get("k") == "v"
    assert tm.context_from_grpc_metadata([]) == {}
    assert tm.context_from_grpc_metadata(None) == {}


def _parent_span_id(s) -> int:
    """The parent's span id of a span from tm.span.

    With no global provider (the normal case in this process) tm.span yields a
    non-recording span that carries its parent's context; if some other test
    installed one, it yields a real child span.
    """
    return s.parent.span_id if s.is_recording() else s.get_span_context().span_id


def test_span_parent_from_carrier_context_or_current():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        outer_ctx = outer.get_span_context()
        with tm.span(tm.CHUNK_SPAN) as s:
            assert _parent_span_id(s) == outer_ctx.span_id
        with tm.span(tm.CHUNK_SPAN, {}) as s:  # empty carrier: the current context stays
            assert _parent_span_id(s) == outer_ctx.span_id
        with tm.span(tm.CHUNK_SPAN, {"traceparent": "garbage"}) as s:
            assert _parent_span_id(s) == outer_ctx.span_id
        with tm.span(tm.CHUNK_SPAN, tm.context_from_grpc_metadata([("user-agent", "x")])) as s:
            assert _parent_span_id(s) == outer_ctx.span_id  # client sent no traceparent
        remote, trace_id, span_id = _new_traceparent()
        with tm.span(tm.CHUNK_SPAN, {"traceparent": remote}) as s:
            assert f"{s.get_span_context().trace_id:032x}" == trace_id
            assert f"{_parent_span_id(s):016x}" == span_id
        with tm.span(tm.CHUNK_SPAN, tm.extract_context({"traceparent": remote})) as s:
            assert f"{_parent_span_id(s):016x}" == span_id
    with pytest.raises(ValueError, match="boom"):
        with tm.span(tm.EGRESS_SPAN):
            raise ValueError("boom")


# --- Ray Serve tracing hooks ---------------------------------------------------------


def test_serve_span_processors_follow_endpoint_env(monkeypatch):
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    assert tm.serve_span_processors() == []

    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.setenv(key, "http://127.0.0.1:4317")
        processors = tm.serve_span_processors()
        assert len(processors) == 1
        assert isinstance(processors[0], BatchSpanProcessor) and isinstance(processors[0], SpanProcessor)
        processors[0].shutdown()
        monkeypatch.delenv(key)


def test_serve_span_processors_satisfy_serve_validation(monkeypatch):
    from ray.serve._private import tracing_utils

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    processors = tracing_utils._load_span_processors(tm.SERVE_SPAN_PROCESSORS_IMPORT_PATH, "unused.json")
    assert len(processors) == 1
    processors[0].shutdown()


def test_serve_tracing_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("OTEL_") or key == "FACECAST_TELEMETRY":
            monkeypatch.delenv(key)
    env = tm.serve_tracing_env()
    assert env == {
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "services.telemetry:serve_span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "1.0",
        "OTEL_SERVICE_NAME": "facecast",
    }
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "facecast-gpu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.cluster.name=c1")
    monkeypatch.setenv("FACECAST_TELEMETRY", "console")
    monkeypatch.setenv("UNRELATED", "x")
    env = tm.serve_tracing_env()
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_SERVICE_NAME"] == "facecast-gpu"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "k8s.cluster.name=c1"
    assert env["FACECAST_TELEMETRY"] == "console"
    assert "UNRELATED" not in env
    assert all(isinstance(v, str) for v in env.values())


# --- a real Ray actor hop --------------------------------------------------------------


@pytest.mark.integration
def test_context_crosses_a_real_ray_actor_call():
    import ray
    assert not ray.is_initialized(), "an earlier test leaked a Ray instance into this process"

    with OtlpReceiver() as receiver:
        ray.init(
            address="local",
            num_cpus=1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:

            @ray.remote(num_cpus=0)
            class ChunkWorker:
                def __init__(self):
                    from services.telemetry import setup_telemetry

                    self.telemetry = setup_telemetry()  # endpoint from the env below

                def decode(self, carrier):
                    from services.telemetry import VAE_DECODE_SPAN, span

                    with span(VAE_DECODE_SPAN, carrier, **{"chunk.index": 7}) as s:
                        span_id = f"{s.get_span_context().span_id:016x}"
                    self.telemetry.force_flush(5)  # tests only; production relies on batching
                    return span_id, self.telemetry.mode

            worker = ChunkWorker.options(
                runtime_env={"env_vars": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}}
            ).remote()

            tracer = TracerProvider().get_tracer("driver")
            with tracer.start_as_current_span("driver.chunk") as parent:
                carrier = tm.inject_context()
            span_id, mode = ray.get(worker.decode.remote(carrier), timeout=60)
        finally:
            ray.shutdown()

        assert mode == "otlp"
        spans = receiver.wait_for_spans(lambda ss: any(s.span_id == span_id for s in ss), timeout_s=10)
    (child,) = [s for s in spans if s.span_id == span_id]
    parent_ctx = parent.get_span_context()
    assert child.name == tm.VAE_DECODE_SPAN
    assert child.trace_id == f"{parent_ctx.trace_id:032x}"
    assert child.parent_span_id == f"{parent_ctx.span_id:016x}"
    assert child.attributes == {"chunk.index": 7}
    assert child.resource["service.name"] == "facecast"
