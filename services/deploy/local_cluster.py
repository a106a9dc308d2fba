"""Start the facecast Serve application on a local Ray cluster (CPU, logical GPUs) — for `facecast serve` and tests.

    cluster = LocalCluster.start({"preset": "tiny"}, grpc_port=free_port())   # ray.init + serve.start + serve.run
    ...
    cluster.stop()

It owns what it starts: the Ray instance (`address="local"`, never someone else's cluster) and, when no
REDIS_URL is given, a real redis-server process for the session store.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from services.deploy.serve_config import (BUILDER_IMPORT_PATH, config_path, load_serve_config,
                                          validate_serve_config)
from services.net import DEFAULT_GRPC_PORT, free_port
from services.serving.app import bind_app
from services.serving.front_door import FrontDoor, FrontDoorOptions, internal_key_digest
from services.serving.settings import GRPC_SERVICERS
from services.store.redis_server import LocalRedis

APP_NAME = "facecast"
DEFAULT_CONFIG = config_path("local")


@dataclass
class LocalCluster:
    grpc_port: int
    redis_url: str
    local_redis: LocalRedis | None
    saved_env: dict[str, str | None]
    config_args: dict | None = None
    config_options: dict | None = None
    http_port: int | None = None
    """Serve's HTTP proxy: the browser call page at http://127.0.0.1:<http_port>/."""
    metrics_port: int | None = None
    """Ray's Prometheus metrics endpoint on this node: http://127.0.0.1:<metrics_port>/metrics."""
    front_door: FrontDoor | None = None
    """The listener clients use when started with one (`facecast serve`); Serve's own gRPC port is then private."""
    declared: dict[str, dict] | None = None
    """Applications deployed from a config (`deploy_app(..., declarative=True)`): name -> its config entry."""

    @property
    def target(self) -> str:
        """Where a client on this machine calls: the front door when there is one, else Serve's gRPC proxy."""
        return self.front_door.target if self.front_door is not None else f"127.0.0.1:{self.grpc_port}"

    @classmethod
    def start(cls, args: dict | None = None, *, config: str | Path = DEFAULT_CONFIG, grpc_port: int = DEFAULT_GRPC_PORT,
              http_port: int | None = None, num_cpus: int | None = None, num_gpus: int = 3,
              env: dict[str, str] | None = None, deployment_options: dict[str, dict] | None = None,
              front_door: FrontDoorOptions | None = None, reflection: bool = True) -> "LocalCluster":
        """Deploy the application of a Serve config file (default: ray_configs/local.yaml) on a fresh local Ray.

        args: overrides of the config's application args; deployment_options: per-deployment option overrides on
        top of the config's (e.g. a pipelined score group's placement group bundles). front_door: serve clients on
        its host and `grpc_port` (TLS when it has files), opened only once the application is ready; Serve's own
        gRPC proxy then listens on a private port and refuses calls that did not come through the door.
        """
        serve_config = load_serve_config(config)
        validate_serve_config(serve_config)
        application = serve_config["applications"][0]
        args = {**application.get("args", {}), **(args or {})}
        options = {entry["name"]: {k: v for k, v in entry.items() if k != "name"}
                   for entry in application.get("deployments", [])}
        for name, extra in (deployment_options or {}).items():
            options[name] = {**options.get(name, {}), **extra}
        internal_key, public_port = None, grpc_port
        if front_door is not None:
            front_door.check()        # a certificate that does not load fails before Ray starts
            internal_key, grpc_port = secrets.token_urlsafe(32), free_port()
            args["internal_key_sha256"] = internal_key_digest(internal_key)
        local_redis = None
        redis_url = args.get("redis_url") or os.environ.get("REDIS_URL")
        if not redis_url:
            local_redis = LocalRedis(supervise=True)
            redis_url = local_redis.url
        args["redis_url"] = redis_url
        env_vars = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        # Serve's proxy and controller do not take the job's runtime_env: put the env where every Ray process
        # started from here inherits it (restored by stop()).
        saved_env = {name: os.environ.get(name) for name in env_vars}
        os.environ.update(env_vars)
        metrics_port = free_port()
        ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 2, 4), num_gpus=num_gpus,
                 include_dashboard=False, runtime_env={"env_vars": env_vars}, log_to_driver=False,
                 _metrics_export_port=metrics_port)
        cluster = cls(grpc_port, redis_url, local_redis, saved_env)
        cluster.http_port = http_port or free_port()
        while cluster.http_port == grpc_port and not http_port:    # the OS may hand the same free port out twice
            cluster.http_port = free_port()
        try:
            serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS),
                                                 enable_reflection=reflection),
                        http_options={"host": "127.0.0.1", "port": cluster.http_port})
            serve.run(bind_app(args, options), name=APP_NAME, route_prefix="/")
            if front_door is not None:
                door = FrontDoor(f"127.0.0.1:{grpc_port}", front_door.host, public_port, tls=front_door.tls,
                                 internal_key=internal_key, reflection=reflection)
                door.start()
                cluster.front_door = door
        except BaseException:      # a failed deploy leaves no Ray, Redis or environment change behind
            cluster.stop()
            raise
        cluster.metrics_port = metrics_port
        cluster.config_args, cluster.config_options = args, options
        return cluster

    def deploy_app(self, name: str, args: dict | None = None,
                   deployment_options: dict[str, dict] | None = None, *, declarative: bool = False) -> None:
        """Deploy one more application (another layout) next to the first; clients select it with the
        `application` gRPC metadata key. Args and options are overrides of the first application's.

        `declarative`: through Serve's config path, as KubeRay applies a RayService's serveConfigV2 (the builder's
        import path, its args, per-deployment options), so a later change of only `num_replicas` (`scale`) is
        applied in place: replicas are added or gracefully stopped, the others keep running. (`serve.run` gives
        every deploy a new code version, which replaces every replica.)"""
        merged_args = {**self.config_args, **(args or {}), "redis_url": self.redis_url}
        options = {key: dict(value) for key, value in self.config_options.items()}
        for deployment, extra in (deployment_options or {}).items():
            options[deployment] = {**options.get(deployment, {}), **extra}
        if not declarative:
            serve.run(bind_app(merged_args, options), name=name, route_prefix=f"/{name}")
            return
        self.declared = self.declared or {}
        self.declared[name] = {"name": name, "route_prefix": f"/{name}", "import_path": BUILDER_IMPORT_PATH,
                               "args": merged_args,
                               "deployments": [{"name": key, **value} for key, value in options.items()]}
        self._apply_declared(wait=True)

    def scale(self, app: str, deployment: str, replicas: int) -> None:
        """Set `num_replicas` of one deployment of a declaratively deployed application (as editing the
        RayService's serveConfigV2 does); returns once the controller has the new config, not when it is done."""
        self.update(app, deployment, num_replicas=replicas)

    def update(self, app: str, deployment: str, **options) -> None:
        """Change options of one deployment of a declaratively deployed application, as editing the RayService's
        serveConfigV2 does: `num_replicas` is applied in place; a changed `ray_actor_options` replaces the replicas
        (Serve starts new ones and stops the old). Returns once the controller has the config, not when it is done."""
        if app not in (self.declared or {}):
            raise ValueError(f"app={app!r} was not deployed declaratively; declared: {sorted(self.declared or {})}")
        entries = self.declared[app]["deployments"]
        entry = next((e for e in entries if e["name"] == deployment), None)
        if entry is None:
            entry = {"name": deployment}
            entries.append(entry)
        entry.update(options)
        self._apply_declared(wait=False)

    def _apply_declared(self, wait: bool) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = ServeDeploySchema.model_validate({"applications": list(self.declared.values())})
        _get_global_client().deploy_apps(config, _blocking=wait)

    def drain(self, grace_s: float = 3.0) -> int:
        """Ask the ingress to drain (`SessionIngressServicer.drain`: chunks in flight delivered, each stream told
        and ended with UNAVAILABLE, sessions kept); the number of streams drained, or -1 when it did not answer.
        The local layouts run one ingress replica, which this reaches."""
        try:
            handle = serve.get_deployment_handle("SessionIngress", app_name=APP_NAME)
            return int(handle.drain.remote(grace_s).result(timeout_s=grace_s + 10))
        except Exception:  # noqa: BLE001 - stopping anyway: a dead ingress has nothing to drain
            return -1

    def stop(self, grace_s: float = 2.0, drain: bool = False) -> None:
        """Stop everything; with `drain`, the ingress's streams are drained first (`facecast serve` on SIGTERM)."""
        try:
            if drain:
                self.drain()
            if self.front_door is not None:
                self.front_door.stop(grace_s)   # new calls refused from here on
                self.front_door = None
            serve.shutdown()
        finally:
            ray.shutdown()
            if self.local_redis is not None:
                self.local_redis.close()
            for name, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

