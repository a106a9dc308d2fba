"""The front door (services/serving/front_door.py) in front of a real gRPC upstream over loopback: every kind of call
passes through unchanged (messages, status, details, trailing metadata, the deadline, cancellation), the internal
key replaces any a client forges, it binds only the host it is given, TLS with a self-signed certificate verified by
the client, plaintext refused on the TLS port, a key that is not the certificate's refused at start, a dead
upstream answered UNAVAILABLE at once, and reflection answered UNIMPLEMENTED when it is turned off."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from services.net import free_port
from services.serving.front_door import INTERNAL_KEY_HEADER, FrontDoor, FrontDoorError, TlsFiles

from tests.tls import self_signed

CANCELLED = threading.Event()


def _upstream_handler():
    def echo(request, context):
        return request

    def headers(request, context):
        return repr(sorted((k, v) for k, v in context.invocation_metadata() if k.startswith("x-"))).encode()

    def count(requests, context):
        for request in requests:
            yield request + b"!"
        yield b"done"

    def fail(request, context):
        context.set_trailing_metadata((("x-reason", "tested"),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sessions: retry later")

    def refuse(requests, context):
        next(requests)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "session_token does not match this session")

    def slow(request, context):
        while context.is_active():
            time.sleep(0.05)
        CANCELLED.set()
        return b""

    def remaining(request, context):
        return f"{context.time_remaining():.1f}".encode()

    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo), "Headers": grpc.unary_unary_rpc_method_handler(
        headers), "Count": grpc.stream_stream_rpc_method_handler(count), "Fail": grpc.unary_unary_rpc_method_handler(
        fail), "Slow": grpc.unary_unary_rpc_method_handler(slow), "Remaining": grpc.unary_unary_rpc_method_handler(
        remaining), "Refuse": grpc.stream_stream_rpc_method_handler(refuse)}
    return grpc.method_handlers_generic_handler("t.T", handlers)


def _reflection_handlers():
    """Stands in for the upstream's reflection service (both versions): answers each request with its bytes."""
    def info(requests, context):
        for request in requests:
            yield request

    return [grpc.method_handlers_generic_handler(
        service, {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(info)})
        for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")]


@pytest.fixture(scope="module")
def upstream():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_upstream_handler(), *_reflection_handlers()))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def door(upstream):
    front = FrontDoor(upstream, "127.0.0.1", free_port(), internal_key="internal-0123456789")
    front.start()
    yield front
    front.stop(grace_s=1)


def _call(channel, kind, method, *args, **kwargs):
    """Call `method`, or without arguments return its multi-callable."""
    callable_ = getattr(channel, kind)(f"/t.T/{method}")
    return callable_(*args, **kwargs) if args else callable_


def test_every_kind_of_call_passes_through_unchanged(door):
    with grpc.insecure_channel(door.target) as channel:
        assert _call(channel, "unary_unary", "Echo", b"hello", timeout=10) == b"hello"
        assert list(_call(channel, "stream_stream", "Count", iter([b"a", b"b"]), timeout=10)) == [b"a!", b"b!", b"done"]
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, "unary_unary", "Fail", b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == "too many sessions: retry later"
        assert ("x-reason", "tested") in caught.value.trailing_metadata()
        assert float(_call(channel, "unary_unary", "Remaining", b"", timeout=7)) == pytest.approx(7, abs=0.6)
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, "unary_unary", "Slow", b"", timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert CANCELLED.wait(5), "the upstream call outlived the caller's deadline"
        CANCELLED.clear()
        pending = _call(channel, "unary_unary", "Slow").future(b"")      # no deadline: the caller hangs up
        time.sleep(0.5)
        pending.cancel()
        assert CANCELLED.wait(5), "the upstream call outlived the caller who cancelled it"
        for _ in range(20):   # an upstream that answers before reading every request: its status, not INTERNAL
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "unary_unary", "Nope", b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as caught:
                list(_call(channel, "stream_stream", "Refuse", iter([b"attach"] * 50), timeout=10))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_internal_key_is_the_doors_whatever_a_client_sends(door):
    with grpc.insecure_channel(door.target) as channel:
        seen = _call(channel, "unary_unary", "Headers", b"", timeout=10,
                     metadata=[(INTERNAL_KEY_HEADER, "forged"), ("x-api-key", "client-key-0123456789")]).decode()
    assert seen == repr([("x-api-key", "client-key-0123456789"), (INTERNAL_KEY_HEADER, "internal-0123456789")])


def test_reflection_passes_through_unless_it_is_turned_off(door, upstream):
    methods = [f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo" for version in ("v1alpha", "v1")]
    with grpc.insecure_channel(door.target) as channel:
        for method in methods:
            assert list(channel.stream_stream(method)(iter([b"list"]), timeout=10)) == [b"list"]
    closed = FrontDoor(upstream, "127.0.0.1", free_port(), reflection=False)
    closed.start()
    try:
        with grpc.insecure_channel(closed.target) as channel:
            for method in methods:
                with pytest.raises(grpc.RpcError) as caught:
                    list(channel.stream_stream(method)(iter([b"list"]), timeout=10))
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert _call(channel, "unary_unary", "Echo", b"still served", timeout=10) == b"still served"
    finally:
        closed.stop(grace_s=1)


def test_it_listens_only_on_the_host_it_is_given(door):
    import socket

    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", door.port)) == 0
    with socket.socket() as probe:       # another loopback address of this machine: nothing listens there
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.2", door.port)) != 0


def test_a_dead_upstream_is_unavailable_at_once():
    front = FrontDoor(f"127.0.0.1:{free_port()}", "127.0.0.1", free_port())
    front.start()
    try:
        with grpc.insecure_channel(front.target) as channel:
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "unary_unary", "Echo", b"x", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - began < 10, "the call waited for its deadline"
    finally:
        front.stop(grace_s=1)


def test_tls_with_a_verifying_client_and_plaintext_refused(upstream, tmp_path):
    cert, key = self_signed(tmp_path)
    front = FrontDoor(upstream, "127.0.0.1", free_port(), tls=TlsFiles(str(cert), str(key)))
    front.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(front.target, credentials) as channel:
            assert _call(channel, "unary_unary", "Echo", b"sealed", timeout=10) == b"sealed"
        with grpc.insecure_channel(front.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "unary_unary", "Echo", b"in the clear", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        other_cert, _ = self_signed(tmp_path, "impostor")      # a client trusting another certificate refuses
        credentials = grpc.ssl_channel_credentials(root_certificates=other_cert.read_bytes())
        with grpc.secure_channel(front.target, credentials) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "unary_unary", "Echo", b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        front.stop(grace_s=1)


def test_a_bad_certificate_or_key_is_refused_at_start(upstream, tmp_path):
    cert, _ = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    with pytest.raises(FrontDoorError, match="is not the private key of --tls-cert"):
        FrontDoor(upstream, "127.0.0.1", free_port(), tls=TlsFiles(str(cert), str(other_key))).start()
    with pytest.raises(FrontDoorError, match="--tls-cert .* cannot be read"):
        FrontDoor(upstream, "127.0.0.1", free_port(), tls=TlsFiles(str(tmp_path / "none"), str(other_key))).start()
    with pytest.raises(FrontDoorError, match="is not a PEM certificate"):
        FrontDoor(upstream, "127.0.0.1", free_port(), tls=TlsFiles(str(other_key), str(other_key))).start()
