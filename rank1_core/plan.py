"""`rank1 plan`: what a configured run would be, computed on the meta device (no download).

For the configured model: the adapter's components by kind (r=1 on q,k,v,o,gate,up,down of
every layer), trainable parameters and their fraction of the base, the size of the
activation store for the configured token count, per-stage memory per GPU, and stage
durations at stated throughputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rank1_core.config import Config
from rank1_core.lora import MODULES, module_kind


@dataclass
class Plan:
    model: str
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    base_params: int
    components: int
    mlp_components: int
    attn_components: int
    lora_params: int
    rank: int
    tokens: int
    mlp_neurons: int
    store_bytes_adapter_fp16: int
    store_bytes_neurons_fp16: int
    gpu_memory_gb: float = 80.0
    modules: tuple[str, ...] = MODULES
    layers_adapted: list[int] | None = None
    """None: every layer."""
    adapter_path: str | None = None
    memory_gb: dict[str, float] = field(default_factory=dict)
    hours: dict[str, float] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.lora_params / self.base_params

    def render(self) -> str:
        gb = 1024 ** 3
        lines = [
            f"model            {self.model}",
            f"shape            {self.layers} layers, hidden {self.hidden_size}, intermediate "
            f"{self.intermediate_size}, vocab {self.vocab_size}",
            f"base parameters  {self.base_params:,}",
            f"adapter          rank {self.rank} on {', '.join(self.modules)} of "
            f"{'every layer' if self.layers_adapted is None else f'layers {self.layers_adapted}'}"
            + (f" (from {self.adapter_path})" if self.adapter_path else ""),
            f"components       {self.components} = {self.mlp_components} MLP + {self.attn_components} attention"
            + (f" ({self.rank} directions per module)" if self.rank > 1 else ""),
            f"trainable        {self.lora_params:,} parameters = {100 * self.trainable_fraction:.4f}% of the base",
            f"activation store {self.tokens:,} tokens x {self.components} components = "
            f"{self.store_bytes_adapter_fp16 / gb:.2f} GB fp16 (+ {self.mlp_neurons} neurons x "
            f"{self.layers} layers = {self.store_bytes_neurons_fp16 / gb:.2f} GB), before compression",
            f"memory per GPU (estimate, GB; GPUs of {self.gpu_memory_gb:g} GB):",
            *[f"  {k:<22s} {v:8.1f}{'  EXCEEDS one GPU: shard more or use bigger GPUs' if v > self.gpu_memory_gb else ''}"
              for k, v in self.memory_gb.items()],
            "duration at the stated throughputs (hours):",
            *[f"  {k:<22s} {v:8.2f}" for k, v in self.hours.items()],
        ]
        return "\n".join(lines)


def lora_shapes(model) -> list[tuple[int, str, int, int]]:
    """(layer, module, in_features, out_features) of every adaptable linear, from module shapes."""
    import torch.nn as nn

    from rank1_core.models import decoder_layers

    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in MODULES and isinstance(mod, nn.Linear):
                out.append((i, leaf, mod.in_features, mod.out_features))
    return out


def make_plan(cfg: Config, rank: int | None = None, modules: tuple[str, ...] | None = None) -> Plan:
    """The plan of `cfg`'s adapter: `train.adapter_path`'s when set (rank, modules and layers read
    from its files and checked against the model), else `train.lora`'s; `rank` / `modules` override."""
    from rank1_core.lora import read_external_adapter
    from rank1_core.models import meta_model

    lora, layers, path = cfg.train.lora, cfg.train.lora.layers, cfg.train.adapter_path
    r, mods = lora.r, tuple(m for m in MODULES if m in lora.target_modules)
    if path:
        spec = read_external_adapter(path, cfg.model)
        r, mods, layers = spec.rank, tuple(spec.modules), spec.layers
    rank = r if rank is None else rank
    modules = mods if modules is None else modules
    model = meta_model(cfg.model)
    hf = model.config
    if layers is not None and sorted(layers) == list(range(hf.num_hidden_layers)):
        layers = None
    shapes = [s for s in lora_shapes(model) if s[1] in modules and (layers is None or s[0] in layers)]
    base_params = sum(p.numel() for p in model.parameters())
    lora_params = sum(rank * (fin + fout) for _, _, fin, fout in shapes)
    n_mlp = sum(1 for s in shapes if module_kind(s[1]) == "mlp")
    tokens = cfg.plan.tokens
    p = Plan(
        model=cfg.model.name, layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size, base_params=base_params,
        components=len(shapes) * rank, mlp_components=n_mlp * rank, attn_components=(len(shapes) - n_mlp) * rank,
        lora_params=lora_params, rank=rank, tokens=tokens, mlp_neurons=cfg.plan.mlp_neurons,
        store_bytes_adapter_fp16=tokens * len(shapes) * rank * 2,
        store_bytes_neurons_fp16=tokens * cfg.plan.mlp_neurons * hf.num_hidden_layers * 2,
        gpu_memory_gb=cfg.plan.gpu_memory_gb, modules=tuple(modules),
        layers_adapted=None if layers is None else sorted(layers), adapter_path=path,
    )
    gb = 1024 ** 3
    gpus = max(cfg.plan.gpus_per_node, 1)
    weights_bf16 = base_params * 2 / gb
    seq = min(cfg.data.max_seq_len, 32768)
    # One sequence per GPU with gradient checkpointing: the bf16 residual stream kept at every
    # layer boundary, one layer's recomputed MLP working set (~3 tensors of seq x intermediate),
    # and the bf16 logits of the sequence.
    act = (hf.num_hidden_layers * seq * hf.hidden_size * 2 + 3 * seq * hf.intermediate_size * 2
           + seq * hf.vocab_size * 2) / gb
    p.memory_gb = {
        # LoRA, ZeRO-3: frozen bf16 weights sharded over the node; adapter + Adam tiny.
        "train (LoRA, ZeRO-3)": weights_bf16 / gpus + act + lora_params * 16 / gb,
        # Full fine-tune, ZeRO-3: bf16 weights + fp32 master + Adam moments (2+4+4+4 bytes).
        "train_full (ZeRO-3)": base_params * 16 / gb / gpus + act,
        # Inference stages hold one whole bf16 copy per actor (1 GPU) or shard with TP.
        "extract (1 actor)": weights_bf16 + hf.num_hidden_layers * 8192 * hf.hidden_size * 2 / gb,
        "evaluate (vLLM, TP=1)": weights_bf16 * 1.1 + 0.1 * cfg.plan.gpu_memory_gb,
    }
    p.memory_gb = {k: round(v, 1) for k, v in p.memory_gb.items()}
    epochs = getattr(getattr(cfg, "train", None), "epochs", None) or 5
    p.hours = {
        "train (LoRA)": tokens * epochs / cfg.plan.train_tokens_per_s / 3600,
        "extract": tokens / cfg.plan.extract_tokens_per_s / 3600,
    }
    p.hours = {k: round(v, 2) for k, v in p.hours.items()}
    return p
