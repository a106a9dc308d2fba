"""`FrontDoor`: the gRPC listener `facecast serve` gives its users — where it says it is, encrypted when asked —
forwarding every call, message for message, to Ray Serve's gRPC proxy on a private port.

    door = FrontDoor(upstream="127.0.0.1:41234", host="127.0.0.1", port=9000, tls=TlsFiles(cert, key),
                     internal_key=secret)
    door.start()          # listening once this returns (gRPC's own threads)
    ...
    door.stop(grace_s=5)  # refuses new calls at once, lets running ones finish for grace_s, then cancels them

Why it exists: Serve 2.60's gRPC proxy binds `[::]` (every interface) with no TLS and accepts calls before the
application is deployed (they hang until their deadline). The front door binds the host it is given (loopback by
default), speaks TLS with the configured certificate, and is opened only once the application is ready, so until
then the port refuses connections (gRPC clients get UNAVAILABLE at once) and afterwards a call to an upstream that
does not answer fails with UNAVAILABLE at once instead of hanging. Every call it forwards carries `internal_key`
(metadata `x-facecast-internal`, any copy a client sent is dropped), and the ingress, told the key's digest, refuses
calls without it: Serve's own port, which listens everywhere, is no way around the front door.

Forwarding is generic: any method, any message (bytes in, bytes out), status, details, initial and trailing metadata,
the caller's deadline and cancellation pass through unchanged. Knows gRPC; nothing about facecast's messages.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.api.validation import INTERNAL_KEY_HEADER

__all__ = ["FrontDoor", "FrontDoorError", "FrontDoorOptions", "TlsFiles", "INTERNAL_KEY_HEADER", "internal_key_digest"]

logger = logging.getLogger("facecast.front_door")

_DROPPED = {INTERNAL_KEY_HEADER, "user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-encoding",
            "grpc-timeout", "accept-encoding"}
_MAX_MESSAGE = 64 * 2**20


class FrontDoorError(RuntimeError):
    """The front door cannot start (a certificate that does not load, a host or port it cannot bind)."""


def internal_key_digest(key: str) -> str:
    """What the ingress is told (`AppSettings.internal_key_sha256`): the hex SHA-256 of the front door's key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and private key, PEM files."""

    cert: str
    key: str

    def credentials(self) -> grpc.ServerCredentials:
        pems = []
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            try:
                pems.append(Path(path).read_bytes())
            except OSError as error:
                raise FrontDoorError(f"{what} {path!r} cannot be read: {error.strerror}") from None
        cert, key = pems
        if b"-----BEGIN CERTIFICATE-----" not in cert:
            raise FrontDoorError(f"--tls-cert {self.cert!r} is not a PEM certificate")
        if b"PRIVATE KEY-----" not in key:
            raise FrontDoorError(f"--tls-key {self.key!r} is not a PEM private key")
        _check_pair(cert, key, self)
        return grpc.ssl_server_credentials([(key, cert)])


def _check_pair(cert: bytes, key: bytes, files: TlsFiles) -> None:
    """Refuse a key that does not belong to the certificate (gRPC would only fail each handshake, quietly)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as error:
        raise FrontDoorError(f"--tls-cert/--tls-key {files.cert!r}, {files.key!r} do not load: {error}") from None
    encoding = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*encoding) != public.public_bytes(*encoding):
        raise FrontDoorError(f"--tls-key {files.key!r} is not the private key of --tls-cert {files.cert!r}")


@dataclass(frozen=True)
class FrontDoorOptions:
    """Where a front door listens (`host`: loopback by default, "0.0.0.0" for every interface) and its TLS files
    (None: plaintext)."""

    host: str = "127.0.0.1"
    tls: TlsFiles | None = None

    def check(self) -> None:
        """Load the TLS pair now (FrontDoorError naming the file) rather than when the door opens."""
        if self.tls is not None:
            self.tls.credentials()


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, door: "FrontDoor"):
        self.door = door

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not self.door.reflection and method.startswith("/grpc.reflection."):
            return None   # UNIMPLEMENTED, as from a server without reflection
        return grpc.stream_stream_rpc_method_handler(self._forwarding(method))

    def _forwarding(self, method: str):
        door = self.door

        def forward(request_iterator, context):
            # The blocking API on purpose: grpc.aio's client marks a call INTERNAL when the upstream answers before
            # it has sent every request message (an unknown method, a refused attach), hiding the real status.
            metadata = [(key, value) for key, value in context.invocation_metadata()
                        if key.lower() not in _DROPPED and not key.startswith(":")]
            if door.internal_key:
                metadata.append((INTERNAL_KEY_HEADER, door.internal_key))
            remaining = context.time_remaining()
            call = door.channel.stream_stream(method)(request_iterator, metadata=metadata,
                                                      timeout=remaining if remaining and remaining < 1e6 else None)
            context.add_callback(call.cancel)     # a caller who goes away takes the upstream call with it
            try:
                initial = call.initial_metadata()
                if initial:
                    context.send_initial_metadata(initial)
                yield from call
                trailing = call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.RpcError as error:
                if error.trailing_metadata():
                    context.set_trailing_metadata(error.trailing_metadata())
                context.abort(error.code(), error.details() or "")

        return forward


class FrontDoor:
    """A gRPC server on `host:port` forwarding everything to `upstream` (see the module docstring); at most
    `max_calls` calls at once (more are answered RESOURCE_EXHAUSTED)."""

    def __init__(self, upstream: str, host: str, port: int, *, tls: TlsFiles | None = None,
                 internal_key: str | None = None, reflection: bool = True, max_calls: int = 256):
        self.upstream, self.host, self.port = upstream, host, port
        self.tls, self.internal_key, self.reflection, self.max_calls = tls, internal_key, reflection, max_calls
        self.channel: grpc.Channel | None = None
        self._server: grpc.Server | None = None

    @property
    def target(self) -> str:
        """Where a client on this machine reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and serve; raises FrontDoorError when the certificate does not load or the address does not bind."""
        credentials = self.tls.credentials() if self.tls else None
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
        self.channel = grpc.insecure_channel(self.upstream, options=options)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_calls, thread_name_prefix="front-door"),
                             handlers=(_Forwarder(self),), options=[*options, ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=self.max_calls)
        try:
            bound = (server.add_secure_port(self.address, credentials) if credentials is not None
                     else server.add_insecure_port(self.address))
        except RuntimeError as error:
            self.channel.close()
            raise FrontDoorError(f"cannot listen on {self.address}: {error}") from None
        if not bound:
            self.channel.close()
            raise FrontDoorError(f"cannot listen on {self.address}")
        server.start()
        self._server = server

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls at once; running calls get `grace_s` seconds to finish, then are cancelled."""
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 5)
            self._server = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
