"""KubeRay RayJob manifests for training: the same `facecast train <stage>` command, on a GPU cluster.

    python -m services.deploy.rayjob render --stage vae > k8s/rayjob-train-vae.yaml
    python -m services.deploy.rayjob render --write          # regenerate every k8s/rayjob-train-<stage>.yaml
    python -m services.deploy.rayjob check [FILE ...]        # validate against the RayJob CRD and our rules

The job's entrypoint is `facecast train <stage> --workers N --gpu` with the run directory and the export on a
persistent volume claim (`facecast-train`), so a restarted job resumes from the last checkpoint; KubeRay sets
RAY_ADDRESS for the entrypoint, which the driver uses instead of starting a local Ray. The cluster is created for
the job and deleted after it (`shutdownAfterJobFinishes`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from services.deploy.kuberay import DEFAULT_IMAGE, HEADER, K8S_DIR, RAY_VERSION
from services.deploy.kuberay_checks import GPU_RESOURCE, schema_problems
from services.deploy.serve_config import DeployConfigError, dump_yaml
from services.cli.train import COMMANDS as STAGES

RAYJOB_CRD = "ray.io_rayjobs.yaml"
TRAIN_VOLUME = "facecast-train"
TRAIN_MOUNT = "/mnt/train"
DEFAULT_WORKERS = 4


def entrypoint(stage: str, workers: int) -> str:
    args = ["facecast", "train", stage, "--workers", str(workers), "--gpu",
            "--data", f"{TRAIN_MOUNT}/world/train-128",
            "--run-dir", f"{TRAIN_MOUNT}/runs" + ("" if stage in ("student", "teacher") else f"/{stage}"),
            "--export", f"{TRAIN_MOUNT}/export/{stage}" + ("" if stage in ("vae", "fast-decoder") else ".safetensors")]
    if stage in ("teacher", "student", "fast-decoder"):
        args += ["--latents", f"{TRAIN_MOUNT}/latents/train-128"]
    if stage == "student":
        args += ["--teacher", f"{TRAIN_MOUNT}/export/teacher.safetensors"]
    return shlex.join(args)


def _container(name: str, image: str, resources: dict) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "env": [{"name": "OMP_NUM_THREADS", "value": "4"}],
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "volumeMounts": [{"name": "train", "mountPath": TRAIN_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]}


def _volumes() -> list[dict]:
    return [{"name": "train", "persistentVolumeClaim": {"claimName": TRAIN_VOLUME}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def render_rayjob(stage: str, workers: int = DEFAULT_WORKERS, image: str = DEFAULT_IMAGE) -> dict:
    if stage not in STAGES:
        raise DeployConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if workers < 1:
        raise DeployConfigError(f"workers={workers} is invalid: at least 1")
    head = _container("ray-head", image, {"cpu": "4", "memory": "16Gi"})
    head["ports"] = [{"name": "gcs-server", "containerPort": 6379, "protocol": "TCP"},
                     {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"}]
    worker = _container("ray-worker", image, {"cpu": "8", "memory": "64Gi", GPU_RESOURCE: "1"})
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"facecast-train-{stage}",
                     "labels": {"app.kubernetes.io/name": "facecast", "app.kubernetes.io/component": "train"},
                     "annotations": {"facecast/stage": stage}},
        "spec": {
            "entrypoint": entrypoint(stage, workers),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 2,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": {"spec": {"containers": [head], "volumes": _volumes()}}},
                "workerGroupSpecs": [{
                    "groupName": "train-gpu", "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [worker], "volumes": _volumes(),
                                          "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists",
                                                           "effect": "NoSchedule"}]}},
                }],
            },
        },
    }


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def validate_rayjob(manifest: dict) -> None:
    """The CRD's schema plus facecast's rules; raises DeployConfigError listing every problem."""
    if not isinstance(manifest, dict):
        raise DeployConfigError(f"a RayJob manifest must be a mapping, got {type(manifest).__name__}")
    problems = []
    if manifest.get("kind") != "RayJob":
        problems.append(f"kind: must be 'RayJob', got {manifest.get('kind')!r}")
    problems += schema_problems(manifest, RAYJOB_CRD)
    spec = manifest.get("spec") or {}
    try:
        args = shlex.split(spec.get("entrypoint") or "")
    except ValueError as error:
        problems.append(f"spec.entrypoint: not a shell command line ({error})")
        args = []
    if args[:2] != ["facecast", "train"] or len(args) < 3 or args[2] not in STAGES:
        problems.append(f"spec.entrypoint: must run `facecast train <{'|'.join(STAGES)}> ...`, "
                        f"got {spec.get('entrypoint')!r}")
    groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    gpus = sum(int(g.get("replicas", 0)) * int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0))
               for g in groups for c in (g.get("template") or {}).get("spec", {}).get("containers", [])[:1])
    workers = int(_flag(args, "--workers") or 1)
    if "--gpu" in args and workers > gpus:
        problems.append(f"spec.entrypoint: --workers {workers} --gpu needs {workers} GPUs, the worker groups "
                        f"have {gpus}")
    run_dir = _flag(args, "--run-dir")
    mounts = [m.get("mountPath", "") for g in groups
              for c in (g.get("template") or {}).get("spec", {}).get("containers", [])
              for m in c.get("volumeMounts") or []]
    if not run_dir or not any(run_dir.startswith(mount.rstrip("/") + "/") for mount in mounts if mount):
        problems.append(f"spec.entrypoint: --run-dir {run_dir!r} must be on a mounted volume of the workers "
                        "(a restarted job resumes from it)")
    if problems:
        raise DeployConfigError(problems)


def manifest_path(stage: str) -> Path:
    return K8S_DIR / f"rayjob-train-{stage}.yaml"


def render_text(stage: str, image: str = DEFAULT_IMAGE) -> str:
    regen = f"# regenerate: python -m services.deploy.rayjob render --stage {stage} > k8s/rayjob-train-{stage}.yaml\n"
    return HEADER.replace("services.deploy.kuberay", "services.deploy.rayjob") + regen + \
        dump_yaml(render_rayjob(stage, image=image))


def check_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        manifest = yaml.safe_load(path.read_text())
        validate_rayjob(manifest)
    except DeployConfigError as error:
        return [f"{path}: {problem}" for problem in error.problems]
    except (OSError, yaml.YAMLError) as error:
        return [f"{path}: {error}"]
    stage = (manifest.get("metadata") or {}).get("annotations", {}).get("facecast/stage")
    if path.name.startswith("rayjob-train-") and stage in STAGES and path.read_text() != render_text(stage):
        return [f"{path}: differs from a fresh render (python -m services.deploy.rayjob render --write)"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.deploy.rayjob", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render")
    target = render.add_mutually_exclusive_group(required=True)
    target.add_argument("--stage", choices=STAGES)
    target.add_argument("--write", action="store_true")
    check = sub.add_parser("check")
    check.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "render":
        if args.write:
            for stage in STAGES:
                manifest_path(stage).write_text(render_text(stage))
        else:
            sys.stdout.write(render_text(args.stage))
        return 0
    problems = [p for f in (args.files or [manifest_path(s) for s in STAGES]) for p in check_file(f)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
