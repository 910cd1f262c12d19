"""Config sections of the stages that generate: evaluate, ablate, steer, transcoder_eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rank1_core.config.errors import ConfigError
from rank1_core.lexicon import HESITATION_WORDS


@dataclass
class VLLMSettings:
    """Engine options of the vLLM backend (the defaults are the ones that work on CPU)."""

    kv_cache_memory_bytes: int = 1 << 30
    """KV-cache size. Always set: without it vLLM reserves ~90% of the machine's memory."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation (needed on CPU; faster start-up everywhere)."""
    max_model_len: Optional[int] = None
    """Longest prompt + generation (tokens). None: the model's maximum context."""
    max_num_seqs: int = 64
    """Sequences the engine schedules at once."""
    tensor_parallel_size: int = 1
    """GPUs one engine spans (set evaluate.actor_gpus to match)."""
    in_process: bool = True
    """Run the engine core inside the actor (VLLM_ENABLE_V1_MULTIPROCESSING=0): no child
    process to outlive a killed actor."""

    def __post_init__(self) -> None:
        if self.kv_cache_memory_bytes < (16 << 20):
            raise ConfigError(f"evaluate.vllm.kv_cache_memory_bytes must be >= 16 MiB, got {self.kv_cache_memory_bytes!r}")
        for name in ("max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.vllm.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"evaluate.vllm.max_model_len must be >= 16, got {self.max_model_len!r}")


@dataclass
class EvaluateConfig:
    """Benchmarks through vLLM / transformers generation; Table 1."""

    variants: list[str] = field(default_factory=lambda: ["base", "lora", "full"])
    """Models to benchmark: base (the base model), lora (train/adapter on the base),
    full (train_full/model). Table 1 needs all three."""
    benchmarks: list[str] = field(default_factory=list)
    """Names of prepared benchmarks (data.benchmarks) to run; empty: all of them."""
    limit: int = 0
    """First N problems of each benchmark (0: all)."""
    samples: int = 1
    """Samples per problem; pass@1 is averaged over them (more than 1 needs temperature > 0)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 512
    """Token budget of one response (thinking + answer)."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation backend. auto: vLLM when it is installed, else transformers batched generation."""
    lora_mode: Literal["auto", "lora_request", "merged", "peft"] = "auto"
    """How an adapter is served: lora_request (vLLM LoRARequest on the base weights), merged
    (merged into the base weights; either backend), peft (transformers + peft adapter).
    auto: lora_request on vLLM, peft on transformers."""
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    """Weights dtype of every variant. None: model.dtype. auto: bfloat16 on CUDA, float32 on CPU
    (one dtype for every variant; bf16 drifts greedy generations)."""
    batch_size: int = 32
    """Prompts handed to one actor call (transformers: one generate() batch)."""
    actors: int = 1
    """Generation actors (Ray Data); each holds one engine."""
    actor_cpus: float = 1.0
    """Logical CPUs Ray reserves per actor."""
    actor_gpus: float = 0.0
    """GPUs per actor (vLLM on GPU: 1, or tensor_parallel_size)."""
    threads: int = 0
    """torch threads per actor (0: every core of the machine)."""
    missing_marker: Literal["wrong", "grade_tail"] = "wrong"
    """A response to a think prompt (s1 format) that never wrote model.answer_marker (cut off
    mid-thought): wrong (graded wrong: it never answered, as in s1's own evaluation) or
    grade_tail (graded on its last tail_chars characters; a number inside unfinished thinking
    can then count). Either way marker_found is false. A plain-prompted variant (base_prompt:
    plain) expects no marker and is graded on its whole response."""
    tail_chars: int = 300
    """Characters graded when missing_marker is grade_tail and a response has no answer marker."""
    base_prompt: Literal["plain", "think"] = "plain"
    """Prompt of the base variant: plain (the model's own chat format, as the paper evaluates
    the base instruct model) or think (ending with model.think_marker, like the fine-tuned
    variants; a base model that never saw the marker may stop at once)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine options."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("evaluate.variants must name at least one variant (base, lora, full)")
        bad = [v for v in self.variants if v not in ("base", "lora", "full")]
        if bad:
            raise ConfigError(f"evaluate.variants: unknown variant {bad[0]!r} (known: base, lora, full)")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"evaluate.variants has duplicates: {self.variants!r}")
        for name in ("samples", "max_new_tokens", "batch_size", "actors", "tail_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("limit", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"evaluate.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ConfigError(f"evaluate.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"evaluate.top_p must be in (0, 1], got {self.top_p!r}")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(
                f"evaluate.samples is {self.samples} but evaluate.temperature is 0: greedy samples are "
                "identical; set a temperature > 0 (e.g. 0.6) or samples: 1"
            )
        if self.actor_cpus <= 0 or self.actor_gpus < 0:
            raise ConfigError(f"evaluate.actor_cpus must be > 0 and evaluate.actor_gpus >= 0, got "
                              f"{self.actor_cpus!r} and {self.actor_gpus!r}")
        if self.backend == "vllm" and self.lora_mode == "peft":
            raise ConfigError("evaluate.lora_mode 'peft' needs evaluate.backend 'transformers' (vLLM serves "
                              "adapters as 'lora_request' or 'merged')")
        if self.backend == "transformers" and self.lora_mode == "lora_request":
            raise ConfigError("evaluate.lora_mode 'lora_request' needs evaluate.backend 'vllm' (transformers "
                              "serves adapters as 'peft' or 'merged')")


@dataclass
class AblationGroup:
    """A set of adapter components ablated together (Table 2: all attention, all MLP)."""

    name: str = "mlp"
    """Name in tables and file names (the variant is called `<name>_ablated`)."""
    modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Adapted matrices whose components are zeroed (q_proj ... down_proj)."""
    layers: list[int] = field(default_factory=list)
    """Layers the group covers (empty: every layer)."""

    def __post_init__(self) -> None:
        known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"ablate.groups: name must be letters, digits, '-' or '_', got {self.name!r}")
        if not self.modules:
            raise ConfigError(f"ablate.groups[{self.name}].modules must name at least one module")
        for m in self.modules:
            if m not in known:
                raise ConfigError(f"ablate.groups[{self.name}].modules: unknown module {m!r} (known: {', '.join(known)})")
        bad = [i for i in self.layers if i < 0]
        if bad:
            raise ConfigError(f"ablate.groups[{self.name}].layers: layer index {bad[0]!r} is negative")


@dataclass
class AblateConfig:
    """Component/layer KL ablations (Figure 1) and group ablations (Table 2)."""

    heldout_docs: int = 0
    """Held-out traces the KL is averaged over (0: every held-out trace in prepare/tokens)."""
    batch_docs: int = 4
    """Traces per forward pass (each pass carries batch_docs x ablations_per_pass rows)."""
    ablations_per_pass: int = 8
    """Ablations stacked into one forward pass (8 = a layer's 7 components + the whole layer)."""
    components: bool = True
    """KL of every single component ablated (Figure 1b)."""
    layers: bool = True
    """KL of every whole layer's adapters ablated (Figure 1a)."""
    groups: list[AblationGroup] = field(default_factory=lambda: [
        AblationGroup(name="attn", modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        AblationGroup(name="mlp", modules=["gate_proj", "up_proj", "down_proj"]),
    ])
    """Groups ablated together: their KL, and (benchmark_groups) their benchmark scores (Table 2)."""
    benchmark_groups: bool = True
    """Benchmark each group-ablated adapter with the evaluate settings (needs the evaluate stage
    done with variants base and lora, for b and l of Table 2)."""
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    """Weights dtype of the KL forward passes. None: model.dtype (auto: as evaluate.dtype)."""
    actors: int = 1
    """KL actors (Ray Data); held-out traces are sharded across them."""
    actor_cpus: float = 1.0
    """Logical CPUs Ray reserves per actor."""
    actor_gpus: float = 0.0
    """GPUs per actor."""
    threads: int = 0
    """torch threads per actor (0: every core of the machine)."""
    top: int = 10
    """Components and layers listed in the printed summary."""

    def __post_init__(self) -> None:
        for name in ("batch_docs", "ablations_per_pass", "actors", "top"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ablate.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("heldout_docs", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ablate.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.actor_cpus <= 0 or self.actor_gpus < 0:
            raise ConfigError(f"ablate.actor_cpus must be > 0 and ablate.actor_gpus >= 0, got "
                              f"{self.actor_cpus!r} and {self.actor_gpus!r}")
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"ablate.groups: duplicate names {dup}")


STEER_MODES = ("scale", "set", "add")


@dataclass
class SteerConfig:
    """Steering: does pushing one adapter direction cause what it fires on? A component's
    lora_A output is scaled, set or shifted (or an SAE feature's decoder direction added to
    the whole adapter state) while the model generates; random directions of equal norm are
    the control. Per alpha: hesitation rate, length, accuracy and KL from the unsteered model."""

    components: list[str] = field(default_factory=list)
    """Components steered by name (`L03_gate_proj`); each must be in the trained adapter."""
    sae_features: list[str] = field(default_factory=list)
    """SAE features steered by name (`F00012`); each must be live (sae/latents.parquet)."""
    auto_components: int = 2
    """Also steer this many components with the most hesitation contexts among their top
    positive contexts (topk/contexts.parquet); 0: none."""
    auto_sae_features: int = 0
    """The same for SAE features (needs a topk stage run after sae); 0: none."""
    auto_offsets: list[int] = field(default_factory=lambda: [0, 1])
    """A top context counts as a hesitation context when a hesitation word starts at one of
    these offsets from the hit token (0: the hit token itself; 1: the next token, i.e. the
    direction fires just before the model writes "Wait")."""
    hesitation_tokens: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Hesitation words (default: `rank1_core.lexicon.HESITATION_WORDS`): counted whole-word and
    case-insensitively in the generated text (the lexicon's one rule), and matched at the start
    of context tokens for the automatic choice."""
    modes: list[Literal["scale", "set", "add"]] = field(default_factory=lambda: ["scale"])
    """How components are steered: scale (lora_A output x alpha: 1 = unsteered, 0 = ablated),
    set (output := alpha x typical), add (output + alpha x typical); typical = the component's
    RMS over every token (topk/stats.parquet). SAE features are always steered with add
    (alpha x their mean activation when firing x their decoder direction)."""
    alphas: list[float] = field(default_factory=lambda: [-100.0, -10.0, 0.0, 1.0, 10.0, 50.0, 100.0])
    """Steering strengths swept for every target and mode (the paper saw effects only above ~50x)."""
    after: Optional[int] = None
    """Steer only tokens at least this many positions after the end of the prompt (0: every
    generated token); None: every token, the prompt included."""
    random_seeds: int = 3
    """Random directions (one per seed, shared by all targets) steered with the same per-token
    perturbation norm as each target and alpha: the control band. 0: no control."""
    random_space: Literal["raw", "normalized"] = "raw"
    """Random directions drawn uniformly in the raw adapter-state space (every component's
    lora_A output), or in units of each component's RMS (then mapped back; same raw norm)."""
    benchmarks: list[str] = field(default_factory=list)
    """Prepared benchmarks (data.benchmarks) whose prompts are steered; empty: all of them."""
    limit: int = 16
    """First N problems of each benchmark."""
    max_new_tokens: int = 128
    """Token budget of one response (greedy decoding)."""
    batch_size: int = 8
    """Prompts generated together (one work unit is one condition on one batch of prompts)."""
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    """Weights dtype. None: model.dtype (auto: as evaluate.dtype)."""
    actors: int = 1
    """Ray actors, each holding the model with the adapter; work units are spread across them."""
    actor_cpus: float = 1.0
    """Logical CPUs Ray reserves per actor."""
    threads: int = 0
    """torch threads per actor (0: every core of the machine)."""
    missing_marker: Literal["wrong", "grade_tail"] = "wrong"
    """A steered response that never wrote model.answer_marker: graded wrong, or on its last
    tail_chars characters (grade_tail); as evaluate.missing_marker."""
    tail_chars: int = 300
    """Characters graded when missing_marker is grade_tail and a response has no answer marker."""
    figure_dpi: int = 110
    """Resolution of the per-feature PNG figures."""

    def __post_init__(self) -> None:
        import re as _re

        for name in ("auto_components", "auto_sae_features", "random_seeds", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"steer.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("limit", "max_new_tokens", "batch_size", "actors", "tail_chars", "figure_dpi"):
            if getattr(self, name) < 1:
                raise ConfigError(f"steer.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.actor_cpus <= 0:
            raise ConfigError(f"steer.actor_cpus must be > 0, got {self.actor_cpus!r}")
        for c in self.components:
            if not _re.fullmatch(r"L\d+_(q|k|v|o|gate|up|down)_proj(_r\d+)?", c):
                raise ConfigError(f"steer.components: {c!r} is not a component name (e.g. L03_gate_proj, "
                                  "or L03_gate_proj_r2 for a direction of a rank-r adapter)")
        for f in self.sae_features:
            if not _re.fullmatch(r"F\d{5,}", f):
                raise ConfigError(f"steer.sae_features: {f!r} is not an SAE feature name (e.g. F00012)")
        for key in ("components", "sae_features", "modes", "alphas"):
            v = getattr(self, key)
            dup = sorted({x for x in v if v.count(x) > 1}, key=str)
            if dup:
                raise ConfigError(f"steer.{key} lists {dup} more than once")
        if not self.modes:
            raise ConfigError("steer.modes must name at least one of scale, set, add")
        if not self.alphas:
            raise ConfigError("steer.alphas must not be empty")
        if any(x != x or abs(x) == float("inf") for x in self.alphas):
            raise ConfigError(f"steer.alphas must be finite numbers, got {self.alphas!r}")
        if not self.hesitation_tokens or any(not w.strip() or w != w.strip() for w in self.hesitation_tokens):
            raise ConfigError("steer.hesitation_tokens must be non-empty words without surrounding spaces, "
                              f"got {self.hesitation_tokens!r}")
        if not self.auto_offsets or any(o < 0 for o in self.auto_offsets):
            raise ConfigError(f"steer.auto_offsets must be a non-empty list of offsets >= 0, got {self.auto_offsets!r}")
        if self.after is not None and self.after < 0:
            raise ConfigError(f"steer.after must be >= 0 or null (every token), got {self.after!r}")
        if not (self.components or self.sae_features or self.auto_components or self.auto_sae_features):
            raise ConfigError("steer: nothing to steer: set steer.components, steer.sae_features, "
                              "steer.auto_components or steer.auto_sae_features")


@dataclass
class TranscoderEvalConfig:
    """Stage `transcoder_eval`: the benchmarks of `evaluate` (same problems, limit, sampling and
    token budget) with the adapters on, and with the hesitation features ablated."""

    reference: Literal["evaluate", "generate"] = "evaluate"
    """Where the base and target scores (for the recovered gain) come from: the evaluate
    stage's summary (done with variants base and full; needs transcoder.target train_full), or
    generated here with the same transformers engine as the adapter variants."""
    limit: int = 0
    """First N problems of each benchmark (0: evaluate.limit). With reference evaluate, the base
    and target scores are recomputed from evaluate's samples of the same problems."""
    batch_size: int = 16
    """Prompts per generate() call."""
    actors: int = 1
    """Generation actors (Ray Data); each holds the base model with the adapters."""
    actor_cpus: float = 1.0
    """Logical CPUs Ray reserves per actor."""
    threads: int = 0
    """torch threads per actor (0: every core)."""
    random_control: bool = True
    """Also ablate as many random live non-hesitation features (seeded): a control variant."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transcoder_eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.limit < 0:
            raise ConfigError(f"transcoder_eval.limit must be >= 0, got {self.limit!r}")
        if self.actor_cpus <= 0:
            raise ConfigError(f"transcoder_eval.actor_cpus must be > 0, got {self.actor_cpus!r}")
        if self.threads < 0:
            raise ConfigError(f"transcoder_eval.threads must be >= 0, got {self.threads!r}")
