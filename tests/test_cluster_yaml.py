"""cluster.yaml against Ray's own cluster-launcher schema, and the stage requests it must serve."""

import copy

import pytest
import yaml

from tests.conftest import REPO


def _load():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid_for_ray():
    _validate(_load())


def test_schema_check_rejects_unknown_keys():
    from jsonschema import ValidationError

    cfg = _load()
    cfg["available_node_types"]["gpu_8x_h200"]["min_wrkers"] = 0
    with pytest.raises(ValidationError, match="min_wrkers"):
        _validate(cfg)


def test_worker_types_autoscale_from_zero_and_gpu_sizes():
    cfg = _load()
    types = cfg["available_node_types"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    big = types["gpu_8x_h200"]["resources"]
    assert big["GPU"] == 8 and big["accelerator_type:H200"] == 8


def test_paper_config_requests_fit_the_gpu_worker_type():
    from rank1_core.config import load_config

    cfg = load_config(REPO / "configs" / "qwen2.5-32b-s1k.yaml")
    node = _load()["available_node_types"]["gpu_8x_h200"]["resources"]
    t = cfg.train
    assert t.num_workers * t.gpus_per_worker <= node["GPU"]
    assert t.num_workers * t.cpus_per_worker <= node["CPU"]
    e = cfg.extract
    assert 0 < e.gpus_per_actor <= node["GPU"] and e.cpus_per_actor * (node["GPU"] // e.gpus_per_actor) <= node["CPU"]
    assert cfg.evaluate.actor_gpus <= node["GPU"]
