"""The rank-1 adapter: peft `LoraConfig` from `train.lora`, checks against the model, and
checks of a saved adapter (every expected module present, no lora_B left at zero).

Components are named `L{layer:02d}_{module}` with modules in the order of `LORA_MODULES`
(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), as every stage names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rank1_core.config import LORA_MODULES, ConfigError, LoraSection, ModelConfig, TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's saved key of one LoRA matrix: ...layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
_KEY = re.compile(r"\.layers\.(\d+)\.[A-Za-z_]+\.([a-z_]+_proj)\.lora_([AB])\.weight$")


class AdapterError(RuntimeError):
    """A saved adapter is incomplete or untrained (e.g. the ZeRO-3 empty-adapter pitfall)."""


def component_name(layer: int, module: str) -> str:
    return f"L{layer:02d}_{module}"


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
    """`L{layer:02d}_{module}` of every saved component, in canonical order."""
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
        mt = _KEY.search(key)
        if mt is None:
            raise AdapterError(f"adapter {adapter_dir}: unexpected tensor {key!r}")
        found.setdefault((int(mt.group(1)), mt.group(2)), {})[mt.group(3)] = t
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
    return AdapterCheck(components=[component_name(*c) for c in expected], rank=lora.r, min_b_norm=min_norm)
