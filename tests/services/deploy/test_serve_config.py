"""ray_configs/*.yaml, the offline Serve-config validator and the resource counting (services/deploy/serve_config.py).

ServeDeploySchema on its own accepts typos, bad strategies and impossible bundles (field notes §0.4); these tests
pin that the validator rejects each of them with a message naming the dotted path or the deployment.
"""

import copy
import sys
import types

import pytest
import yaml

from services.deploy.serve_config import (
    DeployConfigError,
    config_custom_resources,
    config_gpus,
    config_path,
    load_serve_config,
    serve_config_yaml,
    validate_layout,
    validate_serve_config,
)
from services.net import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
from services.serving.settings import DEPLOYMENT_NAMES, GRPC_SERVICERS, LAYOUTS


@pytest.fixture(scope="module")
def configs():
    return {layout: load_serve_config(config_path(layout)) for layout in LAYOUTS}


def dep(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def dep_index(config: dict, name: str) -> int:
    return [d["name"] for d in config["applications"][0]["deployments"]].index(name)


def rejected(config: dict) -> DeployConfigError:
    with pytest.raises(DeployConfigError) as info:
        validate_serve_config(config)
    return info.value


# --------------------------------------------------------------------------------------------- the checked-in files


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checked_in_configs_validate(layout, configs):
    schema = validate_serve_config(configs[layout])
    assert schema.applications[0].name == "facecast"
    validate_layout(layout)  # also checks args.layout matches the file name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_common_shape(layout, configs):
    config = configs[layout]
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"] == {"host": "0.0.0.0", "port": DEFAULT_HTTP_PORT}
    assert config["grpc_options"] == {
        "port": DEFAULT_GRPC_PORT,
        "grpc_servicer_functions": list(GRPC_SERVICERS),   # facecast.v1.AvatarService + grpc.health.v1.Health
        "request_timeout_s": None,
    }
    (app,) = config["applications"]
    assert app["import_path"] == "services.serving.app:build_app"
    assert [d["name"] for d in app["deployments"]] == list(DEPLOYMENT_NAMES)
    assert app["args"]["layout"] == layout
    assert dep(config, "SessionIngress")["max_ongoing_requests"] >= 1000
    for name in ("ScoreWorkerGroup", "VAEDecoder"):
        assert dep(config, name)["ray_actor_options"]["num_gpus"] == 1
    for name in ("SessionIngress", "AudioEncoder", "LLMBridge"):
        assert dep(config, name)["ray_actor_options"]["num_gpus"] == 0


def test_layout_specifics(configs):
    local, one, four = configs["local"], configs["1+1"], configs["4+1"]
    assert local["applications"][0]["args"] == {
        "layout": "local", "preset": "tiny", "steps": 2, "score_mode": "sequential",
        "device": "cpu", "dtype": "float32", "max_sessions": 4,
    }
    assert dep(local, "ScoreWorkerGroup")["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}
    assert dep(local, "VAEDecoder")["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}

    args = one["applications"][0]["args"]
    assert (args["preset"], args["device"], args["dtype"], args["steps"], args["score_mode"]) == (
        "wan-14b", "cuda", "bfloat16", 2, "sequential")
    assert dep(one, "ScoreWorkerGroup")["ray_actor_options"]["resources"] == {"score_slot": 1}
    assert dep(one, "VAEDecoder")["ray_actor_options"]["resources"] == {"vae_slot": 1}

    args = four["applications"][0]["args"]
    assert (args["steps"], args["score_mode"]) == (4, "pipelined")
    score = dep(four, "ScoreWorkerGroup")
    assert score["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}] * 4
    assert score["placement_group_strategy"] == "STRICT_PACK"
    assert score["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert dep(four, "VAEDecoder")["ray_actor_options"]["resources"] == {"vae_slot": 1}


def test_serve_config_yaml_is_deterministic_and_round_trips(configs):
    for config in configs.values():
        text = serve_config_yaml(config)
        assert text == serve_config_yaml(copy.deepcopy(config))
        assert yaml.safe_load(text) == config
        assert text.index("name: facecast") < text.index("import_path")  # key order kept, not sorted


def test_load_rejects_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(DeployConfigError, match="mapping"):
        load_serve_config(path)
    path.write_text("applications: [\n")
    with pytest.raises(DeployConfigError, match="YAML"):
        load_serve_config(path)


# --------------------------------------------------------------------------------------------------- injected typos


def test_typo_num_replica(configs):
    config = copy.deepcopy(configs["1+1"])
    dep(config, "SessionIngress")["num_replica"] = dep(config, "SessionIngress").pop("num_replicas")
    err = rejected(config)
    assert "applications[0].deployments[0].num_replica" in str(err)
    assert sum("num_replica'" in p for p in err.problems) == 1  # named once, not once per pass


def test_typo_ray_actor_options_num_gpu(configs):
    config = copy.deepcopy(configs["1+1"])
    dep(config, "AudioEncoder")["ray_actor_options"]["num_gpu"] = 1
    err = rejected(config)
    assert "applications[0].deployments[1].ray_actor_options.num_gpu" in str(err)


def test_typo_grpc_option(configs):
    config = copy.deepcopy(configs["local"])
    config["grpc_option"] = config.pop("grpc_options")
    err = rejected(config)
    assert any(p.startswith("grpc_option:") for p in err.problems)


def test_typos_in_nested_models(configs):
    config = copy.deepcopy(configs["local"])
    config["http_options"]["hots"] = "0.0.0.0"
    config["applications"][0]["import_pth"] = "x"
    dep(config, "LLMBridge")["autoscaling_config"] = {"min_replicas": 1, "max_replica": 2}
    err = str(rejected(config))
    assert "http_options.hots" in err
    assert "applications[0].import_pth" in err
    assert f"applications[0].deployments[{dep_index(config, 'LLMBridge')}].autoscaling_config.max_replica" in err


def test_bad_placement_group_strategy(configs):
    config = copy.deepcopy(configs["4+1"])
    dep(config, "ScoreWorkerGroup")["placement_group_strategy"] = "STRICT_PACKED"
    err = str(rejected(config))
    assert "(ScoreWorkerGroup)" in err and "STRICT_PACKED" in err


def test_strategy_without_bundles(configs):
    config = copy.deepcopy(configs["1+1"])
    dep(config, "VAEDecoder")["placement_group_strategy"] = "PACK"
    err = str(rejected(config))
    assert "(VAEDecoder)" in err and "placement_group_bundles" in err


def test_gpu_actor_in_cpu_only_bundle(configs):
    config = copy.deepcopy(configs["4+1"])
    score = dep(config, "ScoreWorkerGroup")
    score["placement_group_bundles"] = [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 4
    err = str(rejected(config))
    assert "(ScoreWorkerGroup)" in err and "num_gpus" in err


def test_unknown_deployment_name(configs):
    config = copy.deepcopy(configs["local"])
    dep(config, "VAEDecoder")["name"] = "VaeDecoder"
    err = str(rejected(config))
    assert "applications[0].deployments[3].name: unknown deployment 'VaeDecoder'" in err
    assert "no override for VAEDecoder" in err


def test_duplicate_deployment(configs):
    config = copy.deepcopy(configs["local"])
    config["applications"][0]["deployments"].append(copy.deepcopy(dep(config, "AudioEncoder")))
    assert "configured twice" in str(rejected(config))


@pytest.mark.parametrize("name", ["ScoreWorkerGroup", "VAEDecoder"])
def test_score_and_vae_need_a_gpu(configs, name):
    config = copy.deepcopy(configs["1+1"])
    dep(config, name)["ray_actor_options"]["num_gpus"] = 0.5
    err = str(rejected(config))
    assert f"({name}).ray_actor_options.num_gpus: must be >= 1" in err


def test_score_without_gpu_key(configs):
    config = copy.deepcopy(configs["local"])
    del dep(config, "ScoreWorkerGroup")["ray_actor_options"]["num_gpus"]
    assert "(ScoreWorkerGroup).ray_actor_options.num_gpus" in str(rejected(config))


def test_pipelined_needs_a_gpu_bundle_per_step(configs):
    config = copy.deepcopy(configs["4+1"])
    dep(config, "ScoreWorkerGroup")["placement_group_bundles"] = [{"CPU": 1, "GPU": 1}] * 3
    err = str(rejected(config))
    assert "(ScoreWorkerGroup).placement_group_bundles" in err and "steps=4" in err and "found 3" in err


def test_pipelined_without_bundles(configs):
    config = copy.deepcopy(configs["1+1"])
    config["applications"][0]["args"]["score_mode"] = "pipelined"
    assert "needs at least 2 bundles" in str(rejected(config))


@pytest.mark.parametrize(
    ("key", "value"),
    [("layout", "2+1"), ("preset", "wan-7b"), ("score_mode", "parallel"), ("device", "mps"), ("dtype", "fp8"),
     ("steps", 0), ("steps", "2"), ("max_sessions", -1), ("checkpoint", 3), ("step", 2)],
)
def test_bad_builder_args(configs, key, value):
    config = copy.deepcopy(configs["local"])
    config["applications"][0]["args"][key] = value
    assert f"applications[0].args.{key}" in str(rejected(config))


def test_schema_errors_carry_their_path(configs):
    config = copy.deepcopy(configs["local"])
    dep(config, "SessionIngress")["max_ongoing_requests"] = "many"
    assert "applications[0].deployments[0].max_ongoing_requests" in str(rejected(config))


def test_every_problem_is_reported_at_once(configs):
    config = copy.deepcopy(configs["4+1"])
    config["grpc_option"] = {}
    dep(config, "AudioEncoder")["ray_actor_options"]["num_gpu"] = 1
    dep(config, "VAEDecoder")["ray_actor_options"]["num_gpus"] = 0
    config["applications"][0]["args"]["dtype"] = "fp8"
    err = rejected(config)
    assert len(err.problems) == 4
    assert isinstance(err, ValueError)


def test_layout_mismatch_names_the_file(tmp_path, monkeypatch, configs):
    import services.deploy.serve_config as dc

    config = copy.deepcopy(configs["1+1"])
    config["applications"][0]["args"]["layout"] = "4+1"
    (tmp_path / "1+1.yaml").write_text(serve_config_yaml(config))
    monkeypatch.setattr(dc, "RAY_CONFIGS_DIR", tmp_path)
    monkeypatch.setattr(dc, "REPO_ROOT", tmp_path.parent)
    with pytest.raises(DeployConfigError, match=r"1\+1.yaml.*args.layout"):
        validate_layout("1+1")


# ----------------------------------------------------------------------------------------------------- check_builder


def _fake_app_module(names):
    from ray import serve

    def build_app(args):
        bound = None
        for name in names:
            cls = type(name, (), {"__init__": lambda self, *a: None})
            bound = serve.deployment(name=name)(cls).bind(*([bound] if bound is not None else []))
        return bound

    module = types.ModuleType("services.serving.app")
    module.build_app = build_app
    return module


def test_check_builder_finds_every_deployment(configs, monkeypatch):
    monkeypatch.setitem(sys.modules, "services.serving.app", _fake_app_module(DEPLOYMENT_NAMES))
    validate_serve_config(configs["local"], check_builder=True)


def test_check_builder_reports_missing_deployment(configs, monkeypatch):
    monkeypatch.setitem(sys.modules, "services.serving.app", _fake_app_module(DEPLOYMENT_NAMES[:-1]))
    with pytest.raises(DeployConfigError, match="'LLMBridge' does not exist in the bound graph"):
        validate_serve_config(configs["local"], check_builder=True)


def test_check_builder_against_the_real_app(configs):
    validate_serve_config(configs["local"], check_builder=True)


def test_check_builder_calls_the_builder_as_serve_does(configs, monkeypatch):
    """Serve refuses an import-path builder with more than one parameter (KubeRay's deploy then never becomes ready):
    the check calls the builder through Serve's own rule, not directly."""
    module = _fake_app_module(DEPLOYMENT_NAMES)
    plain = module.build_app
    module.build_app = lambda args, deployment_options=None: plain(args)
    monkeypatch.setitem(sys.modules, "services.serving.app", module)
    with pytest.raises(DeployConfigError, match="build_app.*failed: TypeError: Application builder functions should "
                                                "take exactly one parameter"):
        validate_serve_config(configs["local"], check_builder=True)


# ------------------------------------------------------------------------------------------------- resource demand


@pytest.mark.parametrize("layout,gpus,custom", [
    ("local", 2, {}),                                                          # score 1 + VAE 1
    ("1+1", 2, {"score_slot": ["ScoreWorkerGroup"], "vae_slot": ["VAEDecoder"]}),
    ("4+1", 5, {"vae_slot": ["VAEDecoder"]}),  # 4 bundles of 1 GPU (the replica's own GPU is bundle 0's) + VAE 1
])
def test_checked_in_configs_ask_for(layout, gpus, custom, configs):
    assert config_gpus(configs[layout]) == gpus
    assert config_custom_resources(configs[layout]) == custom


def test_gpus_count_every_replica_and_round_up(configs):
    config = copy.deepcopy(configs["local"])
    dep(config, "ScoreWorkerGroup").update(num_replicas=3, ray_actor_options={"num_cpus": 1, "num_gpus": 0.5})
    del dep(config, "VAEDecoder")["num_replicas"]                        # Serve's default: one replica
    dep(config, "AudioEncoder").update(num_replicas="auto", ray_actor_options={"num_gpus": 0.25},
                                       autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert config_gpus(config) == 4                                         # ceil(3 * 0.5 + 1 + 4 * 0.25) = ceil(3.5)


def test_custom_resources_in_bundles_count(configs):
    config = copy.deepcopy(configs["4+1"])
    dep(config, "ScoreWorkerGroup")["placement_group_bundles"][1]["score_slot"] = 1
    assert config_custom_resources(config) == {"score_slot": ["ScoreWorkerGroup"], "vae_slot": ["VAEDecoder"]}

