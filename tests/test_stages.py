"""The stage graph (rank1_core.stages): complete, acyclic, and the inputs each config picks."""

from __future__ import annotations

import dataclasses
import graphlib
from pathlib import Path

import pytest

from rank1_core.config import Config, ConfigError, config_from_dict, section_hash
from rank1_core.stages import STAGES, stage

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_module_is_declared_and_every_declared_stage_has_one():
    modules = {p.stem for p in (REPO / "ray_jobs").glob("*.py")
               if 'STAGE = "' in p.read_text() and "def run(cfg" in p.read_text()}
    assert modules == set(STAGES)


def test_sections_are_config_sections_and_the_graph_has_no_cycle():
    fields = {f.name for f in dataclasses.fields(Config)}
    for s in STAGES.values():
        assert set(s.sections) <= fields, s.name
        assert set(s.inputs) <= set(STAGES) - {s.name}, s.name
        assert s.outputs and s.about and (REPO / "docs" / "stages" / s.doc).exists(), s.name
    order = list(graphlib.TopologicalSorter({s.name: s.inputs for s in STAGES.values()}).static_order())
    assert order[0] == "prepare" and order[-1] == "report"  # CycleError otherwise


def test_a_stage_the_config_names_must_be_declared():
    with pytest.raises(ConfigError, match="'stages' names unknown stage 'trian' .known: prepare, train, "):
        config_from_dict({"stages": ["prepare", "trian"]})


def _ups(name: str, *overrides: str, done=()):
    cfg = config_from_dict({}, list(overrides))
    return stage(name).upstream(cfg, lambda s: s in done)


def test_inputs_picked_by_the_config():
    assert _ups("train") == ("prepare",)
    assert _ups("train", "train.adapter_path=/some/adapter") == ()
    assert _ups("evaluate", "evaluate.variants=[base]") == ("prepare",)
    assert _ups("evaluate", "evaluate.variants=[full, base, lora]") == ("prepare", "train", "train_full")
    assert _ups("ablate", "ablate.benchmark_groups=false") == ("prepare", "train")
    assert _ups("steer", "steer.components=[L00_q_proj]") == ("prepare", "train", "topk")
    assert _ups("transcoder") == ("prepare", "train_full")
    assert _ups("transcoder", "transcoder.target=tiny-qwen2") == ("prepare",)
    assert _ups("transcoder_eval") == ("prepare", "transcoder", "transcoder_extract", "evaluate")
    assert _ups("transcoder_eval", "transcoder_eval.reference=generate") == (
        "prepare", "transcoder", "transcoder_extract", "train_full")


def test_inputs_picked_by_what_has_finished():
    assert _ups("topk") == ("extract",)
    assert _ups("topk", done=("sae", "transcoder_extract")) == ("extract", "sae", "transcoder_extract")
    assert _ups("topk", "topk.sources=[adapter, sae]") == ("extract", "sae")  # asked for: must be done
    assert _ups("concepts", done=("autointerp", "sae")) == ("prepare", "extract", "sae", "autointerp")
    assert _ups("report", done=("concepts", "prepare", "train")) == ("prepare", "train", "concepts")


def test_section_hash_covers_the_declared_sections_only():
    a = config_from_dict({})
    assert section_hash(a, "topk") == section_hash(config_from_dict({}, ["report.contexts=8"]), "topk")
    assert section_hash(a, "report") != section_hash(config_from_dict({}, ["report.contexts=8"]), "report")
    assert section_hash(a, "topk") != section_hash(config_from_dict({}, ["run.seed=7"]), "topk")
