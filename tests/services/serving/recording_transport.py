"""A recording stand-in for Ray Serve's handle transport, so the ingress and the real worker classes run in one asyncio
loop without Ray — and every hop of every chunk is on record.

It keeps Serve's one rule that matters for the data path: a response (or an object ref from `put`) passed as a
TOP-LEVEL argument of another call is resolved inside the callee, not by the caller.  A response the caller awaits
itself is marked `awaited_by_caller`, so a test can tell "handed on unresolved" from "pulled through the ingress".
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any

from services.serving.call_page import PageContext


@dataclass
class Call:
    deployment: str
    method: str
    args: tuple                       # as passed by the caller (responses unresolved)
    values: list = field(default_factory=list)   # as the callee received them
    result: Any = None
    error: BaseException | None = None
    response: "Response | None" = None


class Response:
    """Stands in for a `DeploymentResponse`: runs eagerly; awaiting it from the caller is recorded."""

    def __init__(self, call: Call, run):
        self.call = call
        self.awaited_by_caller = False
        self.resolved_by: list[str] = []
        self._task = asyncio.ensure_future(run())

    def __await__(self):
        self.awaited_by_caller = True
        return self._task.__await__()

    async def resolve_for(self, deployment: str):
        self.resolved_by.append(deployment)
        return await self._task


class Ref:
    """Stands in for a Ray ObjectRef made by `Transport.put`: resolved only where it is passed as a top-level
    argument (recorded in `resolved_by`); not awaitable, so a caller cannot pull it in by accident."""

    def __init__(self, value):
        self.value = value
        self.resolved_by: list[str] = []

    def resolve_for(self, deployment: str):
        self.resolved_by.append(deployment)
        return self.value


class _Method:
    def __init__(self, handle: "Handle", name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs) -> Response:
        handle = self.handle
        call = Call(handle.deployment, self.name, args)
        handle.transport.calls.append(call)

        async def run():
            call.values = [await arg.resolve_for(handle.deployment) if isinstance(arg, Response)
                           else arg.resolve_for(handle.deployment) if isinstance(arg, Ref) else arg
                           for arg in args]
            try:
                result = getattr(handle.target, self.name)(*call.values, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as error:
                call.error = error
                raise
            call.result = result
            return result

        call.response = Response(call, run)
        return call.response


class Handle:
    """`handle.method.remote(*args)` on a plain object, recorded in `transport.calls`."""

    def __init__(self, transport: "Transport", deployment: str, target):
        self.transport, self.deployment, self.target = transport, deployment, target

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)


class Transport:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def put(self, value) -> Ref:
        """`ray.put` for a deployment built in-process: the value behind a recorded reference."""
        return Ref(value)

    def handle(self, deployment: str, target) -> Handle:
        return Handle(self, deployment, target)

    def to(self, deployment: str, method: str | None = None) -> list[Call]:
        return [call for call in self.calls if call.deployment == deployment and method in (None, call.method)]


class GrpcContext(PageContext):
    """The parts of a gRPC servicer context the ingress uses (the call page's in-process context), with any
    metadata."""

    def __init__(self, metadata=()):
        super().__init__(None)
        self.metadata = list(metadata)
