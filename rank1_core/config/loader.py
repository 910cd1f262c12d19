"""The config loader: the root `Config`, YAML files, dotted overrides, strict checks, hashes.

A config file is a YAML mapping with one section per concern (``run``, ``model``,
``data``, ``train``, ...). Each section is a dataclass of this package (by concern) with a
docstring under every field. Loading checks every key and value: an unknown key or a value
of the wrong type raises :class:`ConfigError` naming the file, the dotted key and the value.

    cfg = load_config("configs/demo.yaml", overrides=["train.lr=3e-4"])
    cfg.train.lr  # 0.0003

No ``ray`` and no ``torch`` here: the CLI and ``rank1 plan`` import this cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rank1_core.config.analysis import ConceptsConfig, ExtractConfig, TopkConfig, TranscoderExtractConfig
from rank1_core.config.data import DataConfig, ModelConfig, PlanConfig, RayConfig, RunConfig
from rank1_core.config.errors import ConfigError
from rank1_core.config.evaluation import AblateConfig, EvaluateConfig, SteerConfig, TranscoderEvalConfig
from rank1_core.config.interpretation import AutointerpConfig, ReportConfig
from rank1_core.config.training import SAEConfig, TrainConfig, TranscoderConfig
from rank1_core.stages import STAGES
from rank1_core.stages import stage as stage_graph


@dataclass
class Config:
    """The whole configuration; one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    topk: TopkConfig = field(default_factory=TopkConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)
    transcoder_extract: TranscoderExtractConfig = field(default_factory=TranscoderExtractConfig)
    transcoder_eval: TranscoderEvalConfig = field(default_factory=TranscoderEvalConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    stages: list[str] = field(default_factory=lambda: ["prepare"])
    """Stages `rank1 run` runs, in order."""
    source: Optional[str] = None
    """File the config was read from (set by the loader)."""
    precision: list = field(default_factory=list, init=False, repr=False, compare=False)
    """What each `auto` precision became and why (rank1_core.device.Choice; set by the loader)."""

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        d.pop("precision", None)
        return d


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against annotation `tp`; convert where harmless (int -> float)."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: '{key}' must not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-3 (no dot) as a string; accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: '{key}' has an unsupported type {tp!r}")  # pragma: no cover


RENAMED_KEYS = {
    "sae.use_gpu": "sae.gpus_per_worker (GPUs per worker, as in train and transcoder; use_gpu: true is "
                   "gpus_per_worker: 1)",
}
"""Keys that are gone, and what replaces them (their errors say so)."""


MOVED_SECTIONS = {
    "transcoder.extract": "the top-level section 'transcoder_extract:' (same keys)",
    "transcoder.hesitation": "'transcoder_extract.hesitation:' (same keys, except random_control: now "
                             "transcoder_eval.random_control)",
    "transcoder.eval": "the top-level section 'transcoder_eval:' (same keys)",
}
"""Subsections that moved (each stage's settings are a section of their own), and where to."""


def _from_dict(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        k = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if k in RENAMED_KEYS:
            raise ConfigError(f"{where}: '{k}' was replaced by {RENAMED_KEYS[k]}")
        if k in MOVED_SECTIONS:
            raise ConfigError(f"{where}: '{k}' moved to {MOVED_SECTIONS[k]}")
        raise ConfigError(f"{where}: unknown key '{k}' (known keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: cannot set '{dotted}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key, value


def _blame_override(err: ConfigError, where: str, overrides) -> ConfigError:
    """An error about a key that an override set names that override, not the file."""
    msg = str(err)
    if not msg.startswith(f"{where}: "):
        return err
    body = msg[len(where) + 2:]
    quoted = body.removeprefix("unknown key ")
    named = quoted.split("'")[1] if quoted.startswith("'") and quoted.count("'") >= 2 else None
    for ov in reversed(list(overrides)):
        key = ov.split("=", 1)[0].strip()
        if named and (named == key or named.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{named}.")):
            return ConfigError(f"override {ov!r}: {body}")
    return err


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "<dict>") -> Config:
    data = json.loads(json.dumps(data))  # deep copy, plain types only
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value, f"override {ov!r}")
    try:
        cfg = _from_dict(Config, data, "", where)
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"{where}: 'stages' names unknown stage {unknown[0]!r} "
                              f"(known: {', '.join(STAGES)})")
    except ConfigError as e:
        raise _blame_override(e, where, overrides) from None
    # Every `auto` precision becomes a concrete value here, once, before anything hashes, saves
    # or runs the config (so the stage hash and the saved config.yaml carry the real choice).
    from rank1_core.device import PrecisionError, resolve_config

    try:
        cfg.precision = resolve_config(cfg)
    except PrecisionError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config; `overrides` are `dotted.key=value` strings applied on top."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    cfg = config_from_dict(data, overrides, where=str(path))
    cfg.source = str(path)
    return cfg


def section_hash(cfg: Config, stage: str) -> str:
    """Hash of what the stage's own output depends on (not the run dir, not Ray): its config
    sections (`rank1_core.stages`) and the seed; the run directory chains its inputs' hashes."""
    sections = stage_graph(stage).sections
    payload = {s: dataclasses.asdict(getattr(cfg, s)) for s in sections}
    payload["seed"] = cfg.run.seed
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
