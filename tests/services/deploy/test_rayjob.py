"""The training RayJob manifests: the checked-in files are valid against KubeRay v1.7's RayJob CRD and equal a fresh
render; the checks catch what would break a training job on a cluster."""

import copy

import pytest
import yaml

from services.deploy.rayjob import STAGES, check_file, manifest_path, render_rayjob, validate_rayjob
from services.deploy.serve_config import DeployConfigError


@pytest.mark.parametrize("stage", STAGES)
def test_checked_in_manifests_are_valid_and_current(stage):
    assert check_file(manifest_path(stage)) == []
    manifest = yaml.safe_load(manifest_path(stage).read_text())
    assert manifest["spec"]["entrypoint"].startswith(f"facecast train {stage} --workers 4 --gpu")


def problems_of(manifest) -> list[str]:
    with pytest.raises(DeployConfigError) as caught:
        validate_rayjob(manifest)
    return caught.value.problems


def test_schema_rejects_an_unknown_key_and_a_wrong_type():
    manifest = render_rayjob("vae")
    manifest["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    manifest["spec"]["backoffLimit"] = "two"
    problems = problems_of(manifest)
    assert any("shutdownAfterJobFinish" in p for p in problems)
    assert any(p.startswith("spec.backoffLimit: must be of type integer") for p in problems)


def test_more_gpu_workers_than_gpus_is_refused():
    manifest = render_rayjob("vae", workers=2)
    manifest["spec"]["entrypoint"] = manifest["spec"]["entrypoint"].replace("--workers 2", "--workers 3")
    assert any("needs 3 GPUs, the worker groups have 2" in p for p in problems_of(manifest))


def test_run_dir_must_be_on_a_volume_and_the_entrypoint_must_train():
    manifest = copy.deepcopy(render_rayjob("probe"))
    manifest["spec"]["entrypoint"] = "facecast train probe --run-dir /tmp/probe"
    assert any("must be on a mounted volume" in p for p in problems_of(manifest))
    manifest["spec"]["entrypoint"] = "python train.py"
    assert any("must run `facecast train" in p for p in problems_of(manifest))
