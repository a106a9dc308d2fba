"""Offline validation of facecast's Ray Serve deploy configs (``ray_configs/*.yaml``).

``ServeDeploySchema`` alone is not enough: in Ray 2.60 it silently ignores unknown keys (``num_replica``,
``ray_actor_options.num_gpu``, ``grpc_option``), bad ``placement_group_strategy`` strings and a GPU actor given a
CPU-only bundle. :func:`validate_serve_config` therefore runs four passes and reports every problem it finds in one
:class:`DeployConfigError`, each naming the dotted path or the deployment:

1. ``ServeDeploySchema.model_validate`` (types, required fields, duplicate application names);
2. a recursive unknown-key walk against the pydantic models' fields;
3. each deployment override built for real with ``serve.deployment(**options)`` (strategy, bundle/actor fit,
   actor-option keys);
4. facecast's own rules: the five deployment names, the builder args' allowed values, score and VAE each on their
   own GPU(s), and a pipelined score group with one GPU bundle per denoising step.

Optionally (``check_builder=True``) it also imports ``services.serving.app``, builds the application from its args and
checks that every configured deployment exists in the bound graph (the controller would otherwise fail at deploy time
with ``Deployment 'X' does not exist``). Needs no Ray cluster; importing ``ray.serve`` takes about a second.

It is also the one place that counts what a config asks Ray for (:func:`replica_bundles`, :func:`config_gpus`,
:func:`config_custom_resources`), for ``facecast serve`` and the KubeRay fit check.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from model_core.config import DEVICES, DTYPES, PRESETS
from services.serving.settings import DEPLOYMENT_NAMES, LAYOUTS, SCORE_MODES, AppSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_CONFIGS_DIR = REPO_ROOT / "ray_configs"

BUILDER_IMPORT_PATH = "services.serving.app:build_app"
SCORE_DEPLOYMENT, VAE_DEPLOYMENT = "ScoreWorkerGroup", "VAEDecoder"
if not {SCORE_DEPLOYMENT, VAE_DEPLOYMENT} <= set(DEPLOYMENT_NAMES):  # pragma: no cover - a rename in settings
    raise ImportError(f"{SCORE_DEPLOYMENT} / {VAE_DEPLOYMENT} are not in services.serving.settings.DEPLOYMENT_NAMES")

# Builder args (the application's ``args:``) and their allowed values; ``None`` = any value of the right type.
ALLOWED_ARGS: dict[str, tuple[str, ...] | None] = {
    "layout": LAYOUTS,
    "preset": tuple(PRESETS),
    "score_mode": SCORE_MODES,
    "device": DEVICES,
    "dtype": DTYPES,
    "steps": None,
    "max_sessions": None,
    "checkpoint": None,
}
_DEFAULTS = AppSettings()


class DeployConfigError(ValueError):
    """A deploy config (or RayService manifest) is invalid. ``problems`` lists every problem found, one per line."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


# --------------------------------------------------------------------------------------------------------- loading


def config_path(layout: str) -> Path:
    """``ray_configs/<layout>.yaml`` for one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise DeployConfigError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return RAY_CONFIGS_DIR / f"{layout}.yaml"


def load_serve_config(path: str | Path) -> dict:
    """Read one Serve config YAML file into a dict (no validation beyond "it is a YAML mapping")."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeployConfigError(f"cannot read Serve config: {exc}", source=str(path)) from exc
    return parse_serve_config(text, source=str(path))


def parse_serve_config(text: str, *, source: str | None = None) -> dict:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"not valid YAML: {exc}", source=source) from exc
    if not isinstance(config, dict):
        raise DeployConfigError(f"a Serve config must be a YAML mapping, got {type(config).__name__}", source=source)
    return config


class _BlockStyleDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as ``|`` block scalars and indents lists under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):  # noqa: D401 - pyyaml hook
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, data: str):
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_BlockStyleDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """Deterministic block-style YAML (keys keep their insertion order; multi-line strings become ``|`` blocks)."""
    return yaml.dump(
        data, Dumper=_BlockStyleDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1_000
    )


def serve_config_yaml(config: dict) -> str:
    """The Serve config as deterministic YAML text (what goes into a RayService's ``spec.serveConfigV2``).

    Key order is the config's own (so ``name`` stays first in each deployment); the same dict always gives the same
    text, and ``yaml.safe_load(serve_config_yaml(c)) == c``.
    """
    return dump_yaml(config)


# ------------------------------------------------------------------------------------------------ resource demand

_STANDARD_RESOURCES = frozenset({"CPU", "GPU", "memory"})


def uses_placement_group(deployment: dict) -> bool:
    """Whether a deployment entry gives its replicas a placement group (a non-empty ``placement_group_bundles``)."""
    bundles = deployment.get("placement_group_bundles")
    return isinstance(bundles, list) and bool(bundles)


def replica_bundles(deployment: dict) -> list[dict[str, float]]:
    """What one replica of a deployment entry asks Ray for, as resource bundles (name -> amount).

    With ``placement_group_bundles``: those bundles (the replica itself runs in bundle 0, the actors it starts in the
    others).  Without: one bundle from ``ray_actor_options`` (``num_cpus`` -> CPU, ``num_gpus`` -> GPU, and its
    custom ``resources``).  Values that are not numbers count as 0 (the schema pass reports them).
    """
    if uses_placement_group(deployment):
        return [{str(name): _num(amount) for name, amount in bundle.items()}
                for bundle in deployment["placement_group_bundles"] if isinstance(bundle, dict)]
    actor = deployment.get("ray_actor_options") if isinstance(deployment.get("ray_actor_options"), dict) else {}
    demand: dict[str, float] = {}
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        if key in actor:
            demand[name] = _num(actor[key])
    custom = actor.get("resources") if isinstance(actor.get("resources"), dict) else {}
    demand.update({str(name): _num(amount) for name, amount in custom.items()})
    return [demand]


def replica_count(deployment: dict) -> int:
    """Replicas of a deployment entry at most: ``num_replicas``, or with autoscaling its ``max_replicas``
    (else ``min_replicas``, else 1)."""
    replicas = deployment.get("num_replicas", 1)
    if _is_int(replicas):
        return max(replicas, 0)
    autoscaling = deployment.get("autoscaling_config") or {}
    return max(int(autoscaling.get("max_replicas") or autoscaling.get("min_replicas") or 1), 1)


def _deployments(serve_config: dict) -> list[dict]:
    return [entry for application in serve_config.get("applications") or [] if isinstance(application, dict)
            for entry in application.get("deployments") or [] if isinstance(entry, dict)]


def config_gpus(serve_config: dict) -> int:
    """GPUs a Serve config's deployments ask for, all replicas together, rounded up: per replica the sum of its
    :func:`replica_bundles`' GPUs."""
    total = sum(sum(bundle.get("GPU", 0.0) for bundle in replica_bundles(entry)) * replica_count(entry)
                for entry in _deployments(serve_config))
    return math.ceil(total)


def config_custom_resources(serve_config: dict) -> dict[str, list[str]]:
    """Custom Ray resources (e.g. ``score_slot``) the config's deployments need -> the deployments needing each.
    A local Ray advertises none, so a config with any cannot be served by ``facecast serve``."""
    needed: dict[str, list[str]] = {}
    for entry in _deployments(serve_config):
        names = {name for bundle in replica_bundles(entry) for name in bundle} - _STANDARD_RESOURCES
        for name in sorted(names):
            needed.setdefault(name, []).append(entry.get("name", "?"))
    return needed


# ------------------------------------------------------------------------------------------------------ validation


def _pydantic_models_in(annotation: Any) -> list[type]:
    """Pydantic model classes an annotation accepts *as the value itself* (through Optional/Union/Annotated)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            args = args[:1]
        found: list[type] = []
        for arg in args:
            found.extend(m for m in _pydantic_models_in(arg) if m not in found)
        return found
    return []


def _container_item_types(annotation: Any) -> tuple[str, Any] | None:
    """("list", item annotation) or ("dict", value annotation) for List/Dict annotations (through Optional/Union)."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List, tuple):  # noqa: UP006 - typing.List is what ray's models use
        args = typing.get_args(annotation)
        return ("list", args[0]) if args else None
    if origin in (dict, typing.Dict):  # noqa: UP006
        args = typing.get_args(annotation)
        return ("dict", args[1]) if len(args) == 2 else None
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        for arg in typing.get_args(annotation)[: 1 if origin is typing.Annotated else None]:
            found = _container_item_types(arg)
            if found is not None:
                return found
    return None


def _walk_unknown_keys(value: Any, annotation: Any, path: str, problems: list[str]) -> None:
    models = _pydantic_models_in(annotation)
    if models and isinstance(value, dict):
        model = models[0]
        fields = model.model_fields
        names = set(fields) | {f.alias for f in fields.values() if f.alias}
        for key, sub in value.items():
            sub_path = f"{path}.{key}" if path else str(key)
            if key not in names:
                allowed = ", ".join(sorted(fields))
                problems.append(f"{sub_path}: unknown key {key!r} (allowed in {model.__name__}: {allowed})")
                continue
            field = fields.get(key) or next(f for f in fields.values() if f.alias == key)
            _walk_unknown_keys(sub, field.annotation, sub_path, problems)
        return
    container = _container_item_types(annotation)
    if container is None:
        return
    kind, item = container
    if kind == "list" and isinstance(value, list):
        for i, sub in enumerate(value):
            _walk_unknown_keys(sub, item, f"{path}[{i}]", problems)
    elif kind == "dict" and isinstance(value, dict) and _pydantic_models_in(item):
        for key, sub in value.items():
            _walk_unknown_keys(sub, item, f"{path}.{key}", problems)


def unknown_key_problems(config: dict) -> list[str]:
    """Every key of ``config`` that no pydantic model of ``ServeDeploySchema``'s tree declares, by dotted path."""
    from ray.serve.schema import ServeDeploySchema

    problems: list[str] = []
    _walk_unknown_keys(config, ServeDeploySchema, "", problems)
    return problems


def _format_pydantic_error(exc: Any) -> list[str]:
    out = []
    for err in exc.errors():
        path = ""
        for part in err.get("loc", ()):
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        out.append(f"{path or '<root>'}: {err.get('msg', 'invalid')}")
    return out


class _Dummy:
    """Stand-in deployment class: options are checked by ``serve.deployment`` without importing the app."""


def _deployment_option_problems(deployment: dict, where: str) -> list[str]:
    from ray import serve

    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    # Unknown keys are reported (by path) by the unknown-key walk; leave them out here so each typo is named once.
    options = {k: v for k, v in deployment.items() if k != "name" and k in DeploymentSchema.model_fields}
    actor = options.get("ray_actor_options")
    if isinstance(actor, dict):
        options["ray_actor_options"] = {k: v for k, v in actor.items() if k in RayActorOptionsSchema.model_fields}
    try:
        serve.deployment(**options)(_Dummy)
    except Exception as exc:  # noqa: BLE001 - Ray raises TypeError/ValueError/pydantic errors here
        return [f"{where}: invalid deployment options: {exc}"]
    return []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _args_problems(args: Any, where: str) -> list[str]:
    if args is None:
        return []
    if not isinstance(args, dict):
        return [f"{where}: builder args must be a mapping"]
    problems = []
    known = {field.name for field in dataclasses.fields(AppSettings)}
    for key, value in args.items():
        path = f"{where}.{key}"
        if key not in ALLOWED_ARGS and key in known:
            continue  # checked as a whole by AppSettings below
        if key not in ALLOWED_ARGS:
            problems.append(f"{path}: unknown builder arg {key!r} (allowed: {', '.join(sorted(known))})")
            continue
        allowed = ALLOWED_ARGS[key]
        if allowed is not None:
            if value not in allowed:
                problems.append(f"{path}: {value!r} is not allowed (allowed: {', '.join(allowed)})")
        elif key in ("steps", "max_sessions"):
            if not _is_int(value) or value < 1:
                problems.append(f"{path}: must be a positive integer, got {value!r}")
        elif key == "checkpoint":
            if value is not None and not (isinstance(value, str) and value):
                problems.append(f"{path}: must be a path string (or null), got {value!r}")
    if not problems:
        try:
            AppSettings.from_args(args)
        except ValueError as error:  # ConfigError names the field
            problems.append(f"{where}: {error}")
    return problems


def _gpu_bundles(deployment: dict) -> int:
    """Placement group bundles of one replica holding a whole GPU (0 without a placement group)."""
    if not uses_placement_group(deployment):
        return 0
    return sum(1 for bundle in replica_bundles(deployment) if bundle.get("GPU", 0.0) >= 1)


def _facecast_problems(app: dict, where: str) -> list[str]:
    """facecast's own rules for an application built by ``services.serving.app:build_app``."""
    problems = []
    args = app.get("args")
    problems += _args_problems(args, f"{where}.args")
    args = args if isinstance(args, dict) else {}

    deployments = app.get("deployments") or []
    by_name: dict[str, tuple[int, dict]] = {}
    for j, dep in enumerate(deployments):
        if not isinstance(dep, dict):
            continue
        name = dep.get("name")
        path = f"{where}.deployments[{j}]"
        if name not in DEPLOYMENT_NAMES:
            problems.append(
                f"{path}.name: unknown deployment {name!r} (services.serving.app binds: {', '.join(DEPLOYMENT_NAMES)})"
            )
        elif name in by_name:
            problems.append(f"{path}.name: deployment {name!r} is configured twice")
        else:
            by_name[name] = (j, dep)

    for name in (SCORE_DEPLOYMENT, VAE_DEPLOYMENT):
        if name not in by_name:
            problems.append(
                f"{where}.deployments: no override for {name}; it must be configured with "
                "ray_actor_options.num_gpus >= 1 so score and VAE never share a GPU"
            )
            continue
        j, dep = by_name[name]
        actor = dep.get("ray_actor_options") or {}
        gpus = actor.get("num_gpus") if isinstance(actor, dict) else None
        if _num(gpus) < 1:
            problems.append(
                f"{where}.deployments[{j}] ({name}).ray_actor_options.num_gpus: must be >= 1 "
                f"(got {gpus!r}) so the score and VAE deployments can never share a GPU"
            )

    if args.get("score_mode", _DEFAULTS.score_mode) == "pipelined" and SCORE_DEPLOYMENT in by_name:
        steps = args.get("steps", _DEFAULTS.steps)
        steps = steps if _is_int(steps) else _DEFAULTS.steps
        j, dep = by_name[SCORE_DEPLOYMENT]
        have = _gpu_bundles(dep)
        if have < steps:
            problems.append(
                f"{where}.deployments[{j}] ({SCORE_DEPLOYMENT}).placement_group_bundles: score_mode pipelined with "
                f"steps={steps} needs at least {steps} bundles with GPU >= 1 (one per denoising step), found {have}"
            )
    if VAE_DEPLOYMENT in by_name:
        j, dep = by_name[VAE_DEPLOYMENT]
        problem = collective_decoder_problem(args.get("latent_transport", _DEFAULTS.latent_transport), dep)
        if problem:
            problems.append(f"{where}.deployments[{j}] ({VAE_DEPLOYMENT}).num_replicas: {problem}")
    return problems


def collective_decoder_problem(latent_transport: str, vae_deployment: dict) -> str | None:
    """What is wrong with this VAEDecoder entry for `latent_transport`, or None: 'collective' links each score
    replica to one VAEDecoder replica, so it allows exactly one."""
    if latent_transport != "collective" or replica_count(vae_deployment) <= 1:
        return None
    return (f"latent_transport 'collective' links each score replica to one VAEDecoder replica, so it needs exactly "
            f"1 VAEDecoder replica (got {replica_count(vae_deployment)}); use latent_transport 'object_store' to run "
            "several")


def _builder_problems(app: dict, where: str) -> list[str]:
    import importlib

    try:
        app_module = importlib.import_module("services.serving.app")  # optional: written separately
    except ImportError as exc:
        raise DeployConfigError(
            f"check_builder=True but services.serving.app is not importable ({exc}); validate without check_builder"
        ) from exc
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    try:   # as Serve calls the import path's builder (its signature checked: exactly one parameter, the args)
        built = call_user_app_builder_with_args_if_necessary(app_module.build_app, dict(app.get("args") or {}))
    except Exception as exc:  # noqa: BLE001
        return [f"{where}.args: services.serving.app.build_app(args) failed: {type(exc).__name__}: {exc}"]
    bound = _bound_deployment_names(built, app.get("name", "default"))
    problems = []
    for j, dep in enumerate(app.get("deployments") or []):
        name = dep.get("name") if isinstance(dep, dict) else None
        if name not in bound:
            problems.append(
                f"{where}.deployments[{j}].name: {name!r} does not exist in the bound graph "
                f"(has: {', '.join(sorted(bound))})"
            )
    return problems


def _bound_deployment_names(built: Any, app_name: str) -> set[str]:
    from ray.serve._private.build_app import build_app as serve_build_app

    return {d.name for d in serve_build_app(built, name=app_name).deployments}


def validate_serve_config(config: dict, *, check_builder: bool = False):
    """Validate a facecast Serve config; returns the ``ServeDeploySchema`` or raises :class:`DeployConfigError`.

    Every problem is collected (schema errors, unknown keys by dotted path such as
    ``applications[0].deployments[1].ray_actor_options.num_gpu``, deployment option errors naming the deployment,
    facecast rules) and raised together.
    """
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        raise DeployConfigError(f"a Serve config must be a mapping, got {type(config).__name__}")

    problems: list[str] = []
    schema = None
    try:
        schema = ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as exc:
        problems += _format_pydantic_error(exc)

    problems += unknown_key_problems(config)

    applications = config.get("applications")
    applications = applications if isinstance(applications, list) else []
    facecast_apps = 0
    for i, app in enumerate(applications):
        if not isinstance(app, dict):
            continue
        where = f"applications[{i}]"
        for j, dep in enumerate(app.get("deployments") or []):
            if isinstance(dep, dict):
                problems += _deployment_option_problems(dep, f"{where}.deployments[{j}] ({dep.get('name')})")
        if app.get("import_path") == BUILDER_IMPORT_PATH:
            facecast_apps += 1
            problems += _facecast_problems(app, where)
            if check_builder and not problems:
                problems += _builder_problems(app, where)
    if applications and not facecast_apps:
        problems.append(f"applications: no application has import_path {BUILDER_IMPORT_PATH!r}")

    if problems:
        raise DeployConfigError(problems)
    return schema


def validate_layout(layout: str, *, check_builder: bool = False):
    """Load and validate ``ray_configs/<layout>.yaml``; errors name the file."""
    path = config_path(layout)
    config = load_serve_config(path)
    problems: list[str] = []
    schema = None
    try:
        schema = validate_serve_config(config, check_builder=check_builder)
    except DeployConfigError as exc:
        problems += exc.problems
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == BUILDER_IMPORT_PATH:
            got = (app.get("args") or {}).get("layout")
            if got != layout:
                problems.append(f"applications[{i}].args.layout: {got!r} in {path.name} (expected {layout!r})")
    if problems:
        raise DeployConfigError(problems, source=str(path.relative_to(REPO_ROOT)))
    return schema
