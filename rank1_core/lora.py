"""The adapter vocabulary and the adapter itself: component names, module kinds, peft keys;
peft `LoraConfig` from `train.lora`, checks against the model, and checks of a saved adapter
(every expected module present, no lora_B left at zero).

This module owns the vocabulary every stage uses (and imports from here):

- the adapted modules of a decoder layer, in the order components are numbered:
  q_proj, k_proj, v_proj, o_proj (attention), gate_proj, up_proj, down_proj (MLP);
- a component is one direction of one adapted module. A rank-r adapter on a module has r
  directions (the r rows of its lora_A), each one scalar per token. Rank 1: the component is
  named `L{layer:02d}_{module}` (`L05_q_proj`, 3 digits for models of >= 100 layers); rank
  r > 1: direction i (0-based row of lora_A) is `L05_q_proj_r{i}` (`L05_q_proj_r0` ..
  `L05_q_proj_r3` for r = 4), and the module's name without the suffix names all r together;
- component_id = (layer * 7 + module index) * r + direction (rank 1: layer * 7 + module index);
- peft's saved keys `...layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>[.<adapter>].weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rank1_core.config import LORA_MODULES, ConfigError, LoraSection, ModelConfig, TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULES = LORA_MODULES
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# A component name: L<layer>_<module>, with _r<direction> for a direction of a rank-r module.
_NAME = re.compile(r"^L(\d+)_([a-z_]+_proj)(?:_r(\d+))?$")
# A module path inside a decoder, or a peft key: "...layers.<i>.<self_attn|mlp>.<module>[.lora_A.weight]".
_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:[A-Za-z0-9_]+\.)*?([a-z_]+_proj)(?:\.|$)")
# peft's saved key of one LoRA matrix (the adapter name segment is optional).
_LORA_KEY = re.compile(r"\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(RuntimeError):
    """A saved adapter is incomplete or untrained (e.g. the ZeRO-3 empty-adapter pitfall)."""


# --------------------------------------------------------------------------- vocabulary


def module_kind(module: str) -> str:
    """'attn' or 'mlp'; an unknown module is an error."""
    if module in ATTN_MODULES:
        return "attn"
    if module in MLP_MODULES:
        return "mlp"
    raise ValueError(f"unknown adapted module {module!r} (known: {', '.join(MODULES)})")


def layer_digits(num_layers: int) -> int:
    return 3 if num_layers >= 100 else 2


def component_name(layer: int, module: str, direction: int | None = None, num_layers: int = 0) -> str:
    """`L05_q_proj` (rank 1, or a whole module), `L05_q_proj_r3` (direction 3 of a rank-r module)."""
    base = f"L{layer:0{layer_digits(num_layers)}d}_{module}"
    return base if direction is None else f"{base}_r{direction}"


def direction_names(layer: int, module: str, rank: int, num_layers: int = 0) -> list[str]:
    """The component names of one adapted module: one for rank 1, r with `_r{i}` for rank r."""
    if rank == 1:
        return [component_name(layer, module, None, num_layers)]
    return [component_name(layer, module, i, num_layers) for i in range(rank)]


def parse_direction(name: str) -> tuple[int, str, int | None]:
    """(layer, module, direction or None) of a component name."""
    m = _NAME.match(name)
    if not m or m.group(2) not in MODULES:
        raise ValueError(f"not a component name: {name!r} (expected L<layer>_<module>[_r<direction>], "
                         "e.g. L03_gate_proj or L03_gate_proj_r2)")
    return int(m.group(1)), m.group(2), None if m.group(3) is None else int(m.group(3))


def parse_component(name: str) -> tuple[int, str]:
    """(layer, module) of a component name (any direction)."""
    layer, module, _ = parse_direction(name)
    return layer, module


def module_of(name: str) -> str:
    """The module's name of a component (`L05_q_proj_r3` -> `L05_q_proj`), 2-digit layers."""
    return component_name(*parse_component(name))


def canonical(name: str) -> str:
    """`L3_q_proj`, `L003_q_proj_r1` -> `L03_q_proj`, `L03_q_proj_r1` (the names hooks and results use)."""
    return component_name(*parse_direction(name))


def component_sort_key(name: str) -> tuple[int, int, int]:
    """Layer, then module in the canonical order (q, k, v, o, gate, up, down), then direction."""
    layer, module, d = parse_direction(name)
    return layer, MODULES.index(module), -1 if d is None else d


def component_id(layer: int, module: str, direction: int = 0, rank: int = 1) -> int:
    return (layer * len(MODULES) + MODULES.index(module)) * rank + direction


def parse_module(path: str) -> tuple[int, str] | None:
    """(layer, module) of a decoder-layer module path or adapter weight key, else None."""
    m = _MODULE.search(path)
    if not m or m.group(2) not in MODULES:
        return None
    return int(m.group(1)), m.group(2)


def lora_key(key: str) -> tuple[int, str, str] | None:
    """(layer, module, 'A' | 'B') of a saved peft LoRA tensor key, else None."""
    mk = _LORA_KEY.search(key)
    lm = parse_module(key) if mk else None
    return None if lm is None else (lm[0], lm[1], mk.group(1))


def saved_components(adapter_dir: str | Path) -> list[str]:
    """Component names of a saved peft adapter, from its lora_A keys and shapes (no weights
    read), in canonical order."""
    from safetensors import safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise AdapterError(f"{adapter_dir} is not a saved peft adapter (no {ADAPTER_WEIGHTS})")
    comps = []
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            lk = lora_key(k)
            if lk and lk[2] == "A":
                comps.extend(direction_names(lk[0], lk[1], int(f.get_slice(k).get_shape()[0])))
    if not comps:
        raise ValueError(f"adapter {adapter_dir} holds no lora_A of q/k/v/o/gate/up/down_proj")
    return sorted(comps, key=component_sort_key)


def adapted_layers(lora: LoraSection, num_layers: int) -> list[int]:
    return sorted(lora.layers) if lora.layers is not None else list(range(num_layers))


def expected_components(lora: LoraSection, num_layers: int) -> list[tuple[int, str]]:
    """(layer, module) of every adapter component, layers ascending, modules in canonical order."""
    mods = [m for m in LORA_MODULES if m in lora.target_modules]
    return [(i, m) for i in adapted_layers(lora, num_layers) for m in mods]


def peft_lora_config(lora: LoraSection, num_layers: int):
    """peft's LoraConfig for `train.lora` (call `validate_for_model` first)."""
    from peft import LoraConfig

    mods = [m for m in LORA_MODULES if m in lora.target_modules]
    extra = {}
    if lora.layers is not None and sorted(lora.layers) != list(range(num_layers)):
        extra = {"layers_to_transform": sorted(lora.layers), "layers_pattern": "layers"}
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, use_rslora=lora.use_rslora, lora_dropout=lora.dropout,
        target_modules=mods, bias="none", task_type="CAUSAL_LM", **extra,
    )


def _num_layers(hf_config) -> int:
    n = getattr(hf_config, "num_hidden_layers", None)
    if n is None:
        text = getattr(hf_config, "text_config", None)
        n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise ConfigError(f"model config {type(hf_config).__name__} has no num_hidden_layers")
    return int(n)


def validate_for_model(train: TrainConfig, model: ModelConfig, mode: str = "lora") -> int:
    """Check `train` against the model's shape before any work starts; returns its layer count.

    Reads only the model's config (a meta-device model, no weights): the layer subset must be
    inside the model, and every target module must exist in its decoder layers.
    """
    from rank1_core.models import meta_model

    m = meta_model(model)
    n = _num_layers(m.config)
    if mode != "lora":
        return n
    lora = train.lora
    if lora.layers is not None:
        bad = [i for i in lora.layers if i >= n]
        if bad:
            raise ConfigError(
                f"train.lora.layers: layer index {bad[0]} is out of range: model {model.name!r} has "
                f"{n} layers (valid: 0..{n - 1})"
            )
    layer0 = {name.rsplit(".", 1)[-1] for name, _ in m.named_modules() if re.search(r"\.layers\.0\.", name + ".")}
    missing = [t for t in lora.target_modules if t not in layer0]
    if missing:
        raise ConfigError(
            f"train.lora.target_modules: model {model.name!r} has no module {missing[0]!r} in its decoder "
            f"layers (it has: {', '.join(sorted(x for x in layer0 if x.endswith('_proj')))})"
        )
    return n


@dataclass
class AdapterCheck:
    components: list[str]
    """Name of every saved component (each direction of each module), in canonical order."""
    rank: int
    min_b_norm: float
    """Smallest L2 norm of a saved lora_B (0 would mean an untrained component)."""


def check_adapter(adapter_dir: str | Path, lora: LoraSection, num_layers: int) -> AdapterCheck:
    """Fail loudly unless the saved adapter holds exactly the expected rank-r components, each
    with a lora_A and a non-zero lora_B."""
    import torch
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / f).exists():
            raise AdapterError(f"adapter {adapter_dir} has no {f}")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        lk = lora_key(key)
        if lk is None:
            raise AdapterError(f"adapter {adapter_dir}: unexpected tensor {key!r}")
        found.setdefault(lk[:2], {})[lk[2]] = t
    expected = expected_components(lora, num_layers)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise AdapterError(f"adapter {adapter_dir}: unexpected component {component_name(*extra[0])}")
    min_norm = float("inf")
    for comp in expected:
        name = component_name(*comp)
        ab = found.get(comp, {})
        if "A" not in ab or "B" not in ab:
            raise AdapterError(f"adapter {adapter_dir}: component {name} is missing lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        if a.numel() == 0 or b.numel() == 0:
            raise AdapterError(f"adapter {adapter_dir}: component {name} was saved empty (shape {tuple(b.shape)}); "
                               "under ZeRO-3 the weights must be gathered before saving")
        if a.shape[0] != lora.r or b.shape[1] != lora.r:
            raise AdapterError(f"adapter {adapter_dir}: component {name} has rank {a.shape[0]}, expected {lora.r}")
        norm = float(b.float().norm())
        if norm == 0.0:
            raise AdapterError(f"adapter {adapter_dir}: lora_B of component {name} is all zeros (untrained or "
                               "saved without gathering ZeRO-3 partitions)")
        min_norm = min(min_norm, norm)
    names = [n for layer, module in expected for n in direction_names(layer, module, lora.r)]
    return AdapterCheck(components=names, rank=lora.r, min_b_norm=min_norm)


# --------------------------------------------------------------------------- an adapter from elsewhere


@dataclass
class AdapterSpec:
    """What a saved peft adapter is, read from its files and checked against the model."""

    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    modules: list[str]
    """Adapted modules, canonical order."""
    layers: list[int]
    components: list[str]
    """Every direction of every adapted module, canonical order."""
    sha256: str
    """Hash of adapter_config.json and the weights (recorded in the train stage's manifest)."""


def adapter_sha256(adapter_dir: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode())
        with open(Path(adapter_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _same_base(recorded: str | None, model: ModelConfig) -> bool:
    """The adapter's base_model_name_or_path names the configured model: the same name, the same
    local directory, or a directory of the same name (a hub id's last part, or a built-in
    model's cache folder, whose name carries the hash of a tiny model's shape)."""
    from rank1_core.models import ModelNotAvailable, resolve_model_dir

    if not recorded or recorded == model.name:
        return True
    last = recorded.rstrip("/").rsplit("/", 1)[-1]
    try:
        local = resolve_model_dir(model)
    except ModelNotAvailable:
        local = None
    if local is not None:
        rec = Path(recorded).expanduser()
        if last == local.name or (rec.exists() and rec.resolve() == local.resolve()):
            return True
    return last == model.name.rstrip("/").rsplit("/", 1)[-1]


def read_external_adapter(adapter_dir: str | Path, model: ModelConfig, key: str = "train.adapter_path") -> AdapterSpec:
    """Check a peft adapter made elsewhere against the configured model before any work starts.

    Every mismatch is a ConfigError naming the adapter_config.json key (base_model_name_or_path,
    peft_type, r, target_modules, layers_to_transform, ...) or the tensor at fault."""
    import json

    from safetensors import safe_open

    from rank1_core.models import meta_model

    p = Path(adapter_dir).expanduser()
    if not (p / ADAPTER_CONFIG).is_file() or not (p / ADAPTER_WEIGHTS).is_file():
        have = sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        raise ConfigError(f"{key}: {str(adapter_dir)!r} is not a peft adapter directory (needs {ADAPTER_CONFIG} "
                          f"and {ADAPTER_WEIGHTS}; found {have or 'nothing'})")
    where = p / ADAPTER_CONFIG
    try:
        conf = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type {conf.get('peft_type')!r} is not LORA")
    for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if conf.get(k):
            raise ConfigError(f"{where}: {k} = {conf[k]!r} is not supported (each direction must be one scalar "
                              "lora_A(x) of one rank for every module)")
    r = conf.get("r")
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}: r = {r!r}; expected a positive integer")
    base = conf.get("base_model_name_or_path")
    if not _same_base(base, model):
        raise ConfigError(f"{where}: base_model_name_or_path {base!r} is not the configured model.name "
                          f"{model.name!r}; set model.name to the adapter's base model")
    targets = conf.get("target_modules")
    if isinstance(targets, (list, tuple)):
        bad = sorted(set(targets) - set(MODULES))
        if bad:
            raise ConfigError(f"{where}: target_modules names {bad[0]!r}; rank1 reads adapters on "
                              f"{', '.join(MODULES)} only")
    m = meta_model(model)
    n = _num_layers(m.config)
    shapes = {}
    for path, mod in m.named_modules():
        lm = parse_module(path)
        if lm is not None and path.endswith(lm[1]) and hasattr(mod, "in_features"):
            shapes[lm] = (mod.in_features, mod.out_features)
    found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    with safe_open(str(p / ADAPTER_WEIGHTS), "pt") as f:
        for k in f.keys():
            lk = lora_key(k)
            if lk is None:
                raise ConfigError(f"{p / ADAPTER_WEIGHTS}: tensor {k!r} is not a lora_A/lora_B of one of "
                                  f"{', '.join(MODULES)} of a decoder layer")
            layer, module, part = lk
            if layer >= n:
                raise ConfigError(f"{p / ADAPTER_WEIGHTS}: tensor {k!r} is on layer {layer}; model {model.name!r} "
                                  f"has {n} layers")
            if isinstance(targets, (list, tuple)) and module not in targets:
                raise ConfigError(f"{where}: target_modules {sorted(targets)} does not list {module!r}, "
                                  f"but the weights hold {k!r}")
            if (layer, module) not in shapes:
                raise ConfigError(f"{where}: target_modules: model {model.name!r} has no module {module!r} "
                                  f"in layer {layer}")
            shape = tuple(f.get_slice(k).get_shape())
            fin, fout = shapes[(layer, module)]
            want = (r, fin) if part == "A" else (fout, r)
            if shape != want:
                got_r = shape[0] if part == "A" else shape[-1]
                what = (f"r = {r} but tensor {k!r} has rank {got_r}" if got_r != r else
                        f"tensor {k!r} has shape {list(shape)}, model {model.name!r} needs {list(want)}")
                raise ConfigError(f"{where}: {what}")
            found.setdefault((layer, module), {})[part] = shape
    if not found:
        raise ConfigError(f"{p / ADAPTER_WEIGHTS}: holds no LoRA tensor")
    half = sorted(c for c, ab in found.items() if len(ab) != 2)
    if half:
        raise ConfigError(f"{p / ADAPTER_WEIGHTS}: module {component_name(*half[0])} has only one of lora_A / lora_B")
    layers = sorted({lay for lay, _ in found})
    ltt = conf.get("layers_to_transform")
    if ltt is not None:
        want_layers = sorted([ltt] if isinstance(ltt, int) else ltt)
        if want_layers != layers:
            raise ConfigError(f"{where}: layers_to_transform {want_layers} differs from the layers in the "
                              f"weights {layers}")
    modules = [x for x in MODULES if any(mod == x for _, mod in found)]
    comps = [c for (lay, mod) in sorted(found, key=lambda lm: (lm[0], MODULES.index(lm[1])))
             for c in direction_names(lay, mod, r)]
    return AdapterSpec(path=p, rank=r, alpha=float(conf.get("lora_alpha", 8)), use_rslora=bool(conf.get("use_rslora")),
                       modules=modules, layers=layers, components=comps, sha256=adapter_sha256(p))
