"""Offline validation of a facecast KubeRay RayService manifest, the way the KubeRay v1.7 operator would check it,
without a cluster.

What lives here
---------------
:func:`validate_rayservice` raises one :class:`~services.deploy.serve_config.DeployConfigError` listing every
problem it finds:

* strict JSON-schema validation against the vendored CRD (``../shared/schemas/kuberay/ray.io_rayservices.yaml``,
  override with ``FACECAST_KUBERAY_SCHEMAS``): ``additionalProperties: false`` on every object that declares
  properties (the ``kubeconform --strict`` equivalent), so typos such as ``minReplica`` are errors;
* the controller's own rules (``ray-operator/controllers/ray/utils/validation.go``): upgrade-strategy type,
  incremental-upgrade requirements, deletion delay, name length and DNS-1035, no ``headService.metadata.name``;
* ``spec.serveConfigV2`` parsed and run through :func:`services.deploy.serve_config.validate_serve_config`;
* facecast's rules: a ``serve-grpc`` port on the head container matching ``grpc_options.port``, the Serve tracing
  env on every Ray container, and every deployment's GPU / custom-resource demand fitting some worker group.

The names those rules look for (``TRACING_ENV``, ``GRPC_PORT_NAME``, ``GPU_RESOURCE``) are defined here and read
by the renderer.

What this file does not know
----------------------------
How a manifest is rendered from a Serve config, the layouts, or the checked-in files
(:mod:`services.deploy.kuberay`, which also holds the command line).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from services.deploy.serve_config import (
    REPO_ROOT,
    DeployConfigError,
    replica_bundles,
    uses_placement_group,
    validate_serve_config,
)
from services.net import DEFAULT_GRPC_PORT

__all__ = [
    "GPU_RESOURCE",
    "GRPC_PORT_NAME",
    "MAX_RAYSERVICE_NAME_LENGTH",
    "TRACING_ENV",
    "UPGRADE_TYPES",
    "schemas_dir",
    "validate_rayservice",
]

# RayService name limit: MaxRayClusterNameLength (53) minus the 6-char suffix the operator appends to cluster names.
MAX_RAYSERVICE_NAME_LENGTH = 47
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
TRACING_ENV = "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"
GRPC_PORT_NAME = "serve-grpc"
GPU_RESOURCE = "nvidia.com/gpu"

_SCHEMA_ENV = "FACECAST_KUBERAY_SCHEMAS"
_RAYSERVICE_CRD = "ray.io_rayservices.yaml"


def schemas_dir() -> Path:
    env = os.environ.get(_SCHEMA_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "schemas" / "kuberay"


def _strictify(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strictify(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strictify(v) for v in node]
    return node


@functools.lru_cache(maxsize=8)
def _crd_validator(directory: str, crd: str = _RAYSERVICE_CRD):
    """A strict (unknown keys rejected) Draft-7 validator for one KubeRay CRD's v1 schema."""
    from jsonschema import Draft7Validator

    path = Path(directory) / crd
    if not path.is_file():
        raise DeployConfigError(
            f"KubeRay CRD not found at {path} (set {_SCHEMA_ENV} to the folder holding {crd})"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as fh:
        crd = yaml.load(fh, Loader=loader)  # noqa: S506 - a SafeLoader
    versions = [v for v in crd["spec"]["versions"] if v.get("name") == "v1"]
    if not versions:
        raise DeployConfigError(f"{path}: the CRD has no v1 version")
    schema = _strictify(copy.deepcopy(versions[0]["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}
    return Draft7Validator(schema)


def _dotted(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object (a map)"
    if isinstance(value, list):
        return "array"
    return "null" if value is None else type(value).__name__


def schema_problems(manifest: dict, crd: str = _RAYSERVICE_CRD) -> list[str]:
    """Every place `manifest` breaks the CRD's schema, as 'dotted.path: what is wrong'."""
    validator = _crd_validator(str(schemas_dir()), crd)
    problems = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        path = _dotted(err.absolute_path)
        if err.validator == "type":
            message = f"must be of type {err.validator_value}, got {_json_type(err.instance)} {_short(err.instance)}"
        else:
            message = err.message if len(err.message) <= 300 else err.message[:297] + "..."
        problems.append(f"{path}: {message}")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return f"({text})" if len(text) <= 60 else f"({text[:57]}...)"


def _controller_problems(manifest: dict) -> list[str]:
    """The RayService rules the KubeRay operator checks at reconcile time (not expressible in the CRD schema)."""
    problems: list[str] = []
    name = (manifest.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: required")
    else:
        if len(name) > MAX_RAYSERVICE_NAME_LENGTH:
            problems.append(
                f"metadata.name: {name!r} is {len(name)} characters; a RayService name must be at most "
                f"{MAX_RAYSERVICE_NAME_LENGTH} (the operator appends a suffix to its RayCluster names)"
            )
        if not DNS1035_LABEL.match(name):
            problems.append(
                f"metadata.name: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', starting "
                "with a letter, ending with a letter or digit)"
            )

    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: required"]
    cluster = spec.get("rayClusterConfig") if isinstance(spec.get("rayClusterConfig"), dict) else {}

    upgrade = spec.get("upgradeStrategy")
    if isinstance(upgrade, dict) and "type" in upgrade:
        kind = upgrade.get("type")
        if kind not in UPGRADE_TYPES:
            problems.append(f"spec.upgradeStrategy.type: {kind!r} is not one of {', '.join(UPGRADE_TYPES)}")
        elif kind == "NewClusterWithIncrementalUpgrade":
            problems += _incremental_upgrade_problems(upgrade, cluster)

    delay = spec.get("rayClusterDeletionDelaySeconds")
    if isinstance(delay, int) and not isinstance(delay, bool) and delay < 0:
        problems.append(f"spec.rayClusterDeletionDelaySeconds: must be >= 0, got {delay}")

    head = cluster.get("headGroupSpec") if isinstance(cluster.get("headGroupSpec"), dict) else {}
    head_service = head.get("headService")
    if isinstance(head_service, dict) and ((head_service.get("metadata") or {}).get("name")):
        problems.append(
            "spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set for a RayService "
            "(the operator names the head service itself)"
        )
    auth = cluster.get("authOptions")
    if isinstance(auth, dict) and auth.get("enableK8sTokenAuth") is True:
        problems.append("spec.rayClusterConfig.authOptions.enableK8sTokenAuth: not supported for a RayService")

    seen: set[str] = set()
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        where = f"spec.rayClusterConfig.workerGroupSpecs[{i}]"
        gname = group.get("groupName")
        if isinstance(gname, str):
            if gname in seen:
                problems.append(f"{where}.groupName: {gname!r} is used by more than one worker group")
            seen.add(gname)
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(f"{where}: minReplicas ({lo}) is greater than maxReplicas ({hi})")
        replicas = group.get("replicas")
        if isinstance(replicas, int) and isinstance(lo, int) and isinstance(hi, int) and not lo <= replicas <= hi:
            problems.append(f"{where}.replicas: {replicas} is outside [minReplicas, maxReplicas] = [{lo}, {hi}]")
    return problems


def _incremental_upgrade_problems(upgrade: dict, cluster: dict) -> list[str]:
    where = "spec.upgradeStrategy"
    problems = []
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append(
            f"{where}.type: NewClusterWithIncrementalUpgrade requires "
            "spec.rayClusterConfig.enableInTreeAutoscaling: true"
        )
    options = upgrade.get("clusterUpgradeOptions")
    if not isinstance(options, dict):
        return problems + [f"{where}.clusterUpgradeOptions: required for NewClusterWithIncrementalUpgrade"]
    surge = options.get("maxSurgePercent", 100)
    step = options.get("stepSizePercent")
    interval = options.get("intervalSeconds")
    if isinstance(surge, int) and not 0 <= surge <= 100:
        problems.append(f"{where}.clusterUpgradeOptions.maxSurgePercent: must be in [0, 100], got {surge}")
    if not isinstance(step, int) or not 0 <= step <= 100:
        problems.append(f"{where}.clusterUpgradeOptions.stepSizePercent: must be in [0, 100], got {step!r}")
    elif isinstance(surge, int) and step > surge:
        problems.append(
            f"{where}.clusterUpgradeOptions.stepSizePercent: {step} must not exceed maxSurgePercent ({surge})"
        )
    if not isinstance(interval, int) or interval <= 0:
        problems.append(f"{where}.clusterUpgradeOptions.intervalSeconds: must be > 0, got {interval!r}")
    if not options.get("gatewayClassName"):
        problems.append(f"{where}.clusterUpgradeOptions.gatewayClassName: required (non-empty)")
    return problems


def _ray_container(group: Any) -> dict:
    """KubeRay treats the first container of a group's pod template as the Ray container."""
    try:
        container = group["template"]["spec"]["containers"][0]
    except (KeyError, IndexError, TypeError):
        return {}
    return container if isinstance(container, dict) else {}


def _cpu_quantity(value: Any) -> float | None:
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _node_capacity(group: dict) -> dict[str, float]:
    """The Ray resources one pod of this group advertises, as KubeRay would start it."""
    params = group.get("rayStartParams") if isinstance(group.get("rayStartParams"), dict) else {}
    resources = _ray_container(group).get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    capacity: dict[str, float] = {}
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu")))
    if cpu is not None and _cpu_quantity(cpu) is not None:
        capacity["CPU"] = _cpu_quantity(cpu)
    gpu = params.get("num-gpus", limits.get(GPU_RESOURCE, 0))
    capacity["GPU"] = _cpu_quantity(gpu) or 0.0
    custom: dict[str, Any] = {}
    if isinstance(params.get("resources"), str):
        try:
            parsed = json.loads(params["resources"].strip().strip("'\""))
            custom.update(parsed if isinstance(parsed, dict) else {})
        except ValueError:
            pass
    if isinstance(group.get("resources"), dict):
        custom.update(group["resources"])
    for key, value in custom.items():
        amount = _cpu_quantity(value)
        if amount is not None:
            capacity[key] = amount
    return capacity


def _deployment_demands(dep: dict) -> list[tuple[str, dict[str, float]]]:
    """(description, per-node demand) for one replica of a deployment override (its :func:`replica_bundles`)."""
    bundles = replica_bundles(dep)
    if not uses_placement_group(dep):
        return [("one replica", bundles[0])]
    if dep.get("placement_group_strategy") == "STRICT_PACK":
        total: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
        return [(f"its STRICT_PACK placement group ({len(bundles)} bundles on one node)", total)]
    return [(f"placement group bundle {i}", bundle) for i, bundle in enumerate(bundles)]


def _fit_problems(serve_config: dict, cluster: dict) -> list[str]:
    """Every deployment's per-node demand must fit on some worker group's pod (GPUs and custom resources)."""
    groups = [g for g in cluster.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    capacities = {str(g.get("groupName")): _node_capacity(g) for g in groups}
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        capacities["<head>"] = _node_capacity(head)
    problems = []
    for app in serve_config.get("applications") or []:
        for dep in (app.get("deployments") or []) if isinstance(app, dict) else []:
            if not isinstance(dep, dict):
                continue
            for what, demand in _deployment_demands(dep):
                if not any(v > 0 for v in demand.values()):
                    continue
                fits = [
                    name
                    for name, cap in capacities.items()
                    if all(v <= 0 or cap.get(k, 0.0 if k != "CPU" else float("inf")) >= v for k, v in demand.items())
                ]
                if not fits:
                    have = "; ".join(f"{n}: {_fmt_resources(c)}" for n, c in capacities.items())
                    problems.append(
                        f"spec.serveConfigV2: deployment {dep.get('name')!r} needs {_fmt_resources(demand)} on one "
                        f"node for {what}, but no worker group provides that ({have})"
                    )
    return problems


def _fmt_resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _facecast_problems(manifest: dict, serve_config: dict | None) -> list[str]:
    problems: list[str] = []
    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
    cluster = spec.get("rayClusterConfig") if isinstance(spec.get("rayClusterConfig"), dict) else {}
    head = cluster.get("headGroupSpec") if isinstance(cluster.get("headGroupSpec"), dict) else {}
    head_container = _ray_container(head)
    ports = [p for p in head_container.get("ports") or [] if isinstance(p, dict)]
    grpc = [p for p in ports if p.get("name") == GRPC_PORT_NAME]
    head_path = "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports"
    grpc_port = ((serve_config or {}).get("grpc_options") or {}).get("port", DEFAULT_GRPC_PORT)
    if not grpc:
        problems.append(
            f"{head_path}: no port named {GRPC_PORT_NAME!r} on the head container; KubeRay (>= 1.6) only exposes "
            f"'serve' / 'serve-*' ports on the serve Service, so gRPC port {grpc_port} would be unreachable"
        )
    elif grpc[0].get("containerPort") != grpc_port:
        problems.append(
            f"{head_path}: port {GRPC_PORT_NAME!r} is {grpc[0].get('containerPort')!r} but serveConfigV2 "
            f"grpc_options.port is {grpc_port}"
        )

    named = [("spec.rayClusterConfig.headGroupSpec", head)] + [
        (f"spec.rayClusterConfig.workerGroupSpecs[{i}]", g)
        for i, g in enumerate(cluster.get("workerGroupSpecs") or [])
        if isinstance(g, dict)
    ]
    for where, group in named:
        container = _ray_container(group)
        if not container:
            continue
        env_names = {e.get("name") for e in container.get("env") or [] if isinstance(e, dict)}
        if TRACING_ENV not in env_names:
            problems.append(
                f"{where}.template.spec.containers[0].env: {TRACING_ENV} missing; Serve 2.60 proxies only trace "
                "with the env var set on every node"
            )
    if serve_config is not None:
        problems += _fit_problems(serve_config, cluster)
    return problems


def validate_rayservice(manifest: dict) -> None:
    """Validate a facecast RayService manifest; raises :class:`DeployConfigError` listing every problem."""
    if not isinstance(manifest, dict):
        raise DeployConfigError(f"a RayService manifest must be a mapping, got {type(manifest).__name__}")
    problems: list[str] = []
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: must be 'ray.io/v1', got {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != "RayService":
        problems.append(f"kind: must be 'RayService', got {manifest.get('kind')!r}")
    problems += schema_problems(manifest)
    problems += _controller_problems(manifest)

    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
    raw = spec.get("serveConfigV2")
    serve_config = None
    if raw is None:
        problems.append("spec.serveConfigV2: required (facecast deploys its Serve app through the RayService)")
    elif isinstance(raw, str):
        try:
            serve_config = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append(f"spec.serveConfigV2: not valid YAML: {exc}")
        if serve_config is not None and not isinstance(serve_config, dict):
            problems.append("spec.serveConfigV2: the YAML string must hold a mapping (a Serve config)")
            serve_config = None
        if serve_config is not None:
            try:
                validate_serve_config(serve_config)
            except DeployConfigError as exc:
                problems += [f"spec.serveConfigV2: {p}" for p in exc.problems]
    elif not any(p.startswith("spec.serveConfigV2:") for p in problems):
        problems.append("spec.serveConfigV2: must be a YAML string (a block scalar), not a map")
    problems += _facecast_problems(manifest, serve_config)
    if problems:
        raise DeployConfigError(problems)
