"""facecast's public gRPC API (`protos/facecast/v1/avatar.proto`): generated messages and stubs.

    from services.api import pb, pb_grpc, SERVICE_NAME
    pb.CreateSessionRequest(reference_image=png_bytes)      # messages: facecast.v1.*
    pb_grpc.AvatarServiceStub(channel)                     # client stub
    pb_grpc.add_AvatarServiceServicer_to_server(servicer, server)

`pb` is `services.api.generated.facecast.v1.avatar_pb2` and `pb_grpc` its `avatar_pb2_grpc`. They are generated
by `services/api/build.py` into `services/api/generated/` (git-ignored, never edited by hand). The first access to
`pb` / `pb_grpc` builds them when they are missing or were generated from another version of the .proto (so a
fresh clone just works); `python -m services.api.build` does the same explicitly. The generated modules use
relative imports, so they load as an ordinary subpackage without any `sys.path` changes.

(`pb` and `pb_grpc` are resolved lazily, on first access, so that `python -m services.api.build` can run — and
report a broken .proto cleanly — without this package importing the build module first.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

SERVICE_NAME = "facecast.v1.AvatarService"
"""Full name of the service, for gRPC health checks (`grpc_health`) and server reflection (`grpc_reflection`)."""

if TYPE_CHECKING:  # pragma: no cover - static types for IDEs / checkers
    from services.api.generated.facecast.v1 import avatar_pb2 as pb
    from services.api.generated.facecast.v1 import avatar_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "SERVICE_NAME"]


def _load() -> None:
    from services.api.build import ensure_built

    ensure_built()
    from services.api.generated.facecast.v1 import avatar_pb2, avatar_pb2_grpc

    if avatar_pb2.DESCRIPTOR.services_by_name["AvatarService"].full_name != SERVICE_NAME:  # pragma: no cover
        raise ImportError(f"avatar.proto no longer defines {SERVICE_NAME}")
    globals().update(pb=avatar_pb2, pb_grpc=avatar_pb2_grpc)


def __getattr__(name: str):
    if name in ("pb", "pb_grpc"):
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
