"""The gRPC servicer registrations Serve's proxy is given (`grpc_servicer_functions` in ray_configs/ and k8s/):
facecast.v1.AvatarService and grpc.health.v1.Health, with request parsing that never fails.

gRPC's Python server answers a request whose bytes do not parse (truncated, corrupt) with UNKNOWN ("Unexpected
<class DecodeError>"), which the API does not document. Registered through these functions instead of the generated
ones, such a request reaches the servicer as an empty message of its type carrying a marker (an unknown field, which
survives Ray's serialization), and the servicer answers INVALID_ARGUMENT naming the type (`require_decodable`).
Everything else is the generated registration: same methods, same types, same serializers.
"""

from __future__ import annotations

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import unknown_fields
from google.protobuf.internal import encoder

__all__ = ["add_AvatarServiceServicer_to_server", "add_HealthServicer_to_server", "undecodable",
           "require_decodable"]

_MARK_FIELD = 536_870_911   # the largest field number protobuf allows: no facecast or health message uses it


def _lenient(message_class):
    """A request deserializer: the parsed message, or, for bytes that do not parse, an empty one carrying the
    parser's complaint in the marker field."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except protobuf_message.DecodeError as error:
            text = (str(error) or "the wire format is corrupt")[:200].encode("utf-8", "replace")
            marked = message_class()
            marked.MergeFromString(encoder.TagBytes(_MARK_FIELD, 2) + encoder._VarintBytes(len(text)) + text)
            return marked

    return parse


def undecodable(request) -> str | None:
    """The parse error of a request that did not parse (see the module docstring), else None."""
    try:
        for field in unknown_fields.UnknownFieldSet(request):
            if field.field_number == _MARK_FIELD:
                return bytes(field.data).decode("utf-8", "replace")
    except TypeError:   # not a protobuf message
        return None
    return None


def require_decodable(request, what: str) -> None:
    """INVALID_ARGUMENT (an `ApiError`) when `request` is the stand-in for bytes that did not parse."""
    problem = undecodable(request)
    if problem is not None:
        from services.api.validation import ApiError

        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {what} ({problem})")


def _register(servicer, server, service_descriptor, message_class_of) -> None:
    handlers = {}
    for method in service_descriptor.methods:
        kind = ("stream" if method.client_streaming else "unary") + "_" + (
            "stream" if method.server_streaming else "unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=_lenient(message_class_of(method.input_type)),
                                     response_serializer=message_class_of(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))
    server.add_registered_method_handlers(service_descriptor.full_name, handlers)


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def add_AvatarServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 - gRPC's naming
    """facecast.v1.AvatarService, as the generated function registers it, with lenient request parsing."""
    from services.api import pb

    _register(servicer, server, pb.DESCRIPTOR.services_by_name["AvatarService"], _message_class)


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 - gRPC's naming
    """grpc.health.v1.Health, with lenient request parsing."""
    from grpc_health.v1 import health_pb2

    _register(servicer, server, health_pb2.DESCRIPTOR.services_by_name["Health"], _message_class)
