"""One config system for every stage: dataclasses, YAML files, dotted overrides.

A config file is a YAML mapping with one section per concern (``run``, ``model``,
``data``, ``train``, ...). Each section is a dataclass below with a docstring under every
field. Loading checks every key and value: an unknown key or a value of the wrong type
raises :class:`ConfigError` naming the file, the dotted key and the value.

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

from rank1_core.lexicon import HESITATION_WORDS


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names which."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    """Run directory: a local path or a pyarrow filesystem URI (s3://, gs://, file://)."""
    seed: int = 0
    """Seed for data generation, shuffling, initialisation and sampling."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Cluster to join. None: $RAY_ADDRESS if set, else start a local instance."""
    num_cpus: Optional[int] = 4
    """Logical CPUs of a local instance. More than the cores avoids actor-pool deadlocks
    on 2-core machines (measured: 2 logical CPUs + a 2-actor pool deadlocked)."""
    object_store_memory: Optional[int] = None
    """Bytes for a local object store (None: Ray's default)."""


@dataclass
class TinyModelConfig:
    """A tiny model with random weights (model.name tiny-qwen2 or tiny-llama), built from
    a config for tests and smoke runs; both use the real Qwen2.5 vocabulary and chat format."""

    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 64
    """Residual width."""
    intermediate_size: int = 128
    """MLP width."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    init_seed: int = 0
    """Seed of the random weights."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.tiny.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.tiny.num_heads ({self.num_heads}) must be divisible by "
                f"model.tiny.num_kv_heads ({self.num_kv_heads})"
            )


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base model: a built-in name (smollm2-135m-instruct, tiny-qwen2, tiny-llama), a local
    Hugging Face model directory, or a hub id (used only if already in the local HF cache)."""
    revision: Optional[str] = None
    """Hub revision for a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype when loading for inference (training has its own precision switch).
    auto: bfloat16 where the hardware runs it fast, else float32 (rank1_core/device.py)."""
    think_marker: str = "<|im_start|>think"
    """Opens the thinking part of the assistant turn (s1's sentinel)."""
    answer_marker: str = "<|im_start|>answer"
    """Opens the answer part of the assistant turn (s1's sentinel)."""
    system_prompt: Optional[str] = None
    """System prompt. None: the model's chat-template default (Qwen's for Qwen models)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of tiny-* models (ignored otherwise)."""


@dataclass
class BenchmarkConfig:
    name: str = "arith-heldout"
    """Name in tables and file names."""
    source: Literal["synthetic", "math500", "aime24", "gpqa_diamond"] = "synthetic"
    """Loader: offline held-out problems from reasoning-gym, or a published benchmark."""
    path: Optional[str] = None
    """Local Parquet/JSONL file or hub dataset id (published benchmarks only)."""
    task: str = "chain_sum"
    """reasoning-gym task of a synthetic benchmark."""
    task_config: dict = field(default_factory=dict)
    """Options of the reasoning-gym task."""
    size: int = 100
    """Problems (synthetic: generated; published: the first `size`, 0 = all)."""

    def __post_init__(self) -> None:
        if self.source != "synthetic" and self.path is None:
            raise ConfigError(
                f"benchmark {self.name!r}: source {self.source!r} needs a 'path' "
                "(a local Parquet/JSONL file or a hub dataset id)"
            )
        if self.size < 0:
            raise ConfigError(f"benchmark {self.name!r}: size must be >= 0, got {self.size}")


@dataclass
class TaskMix:
    task: str = "chain_sum"
    """reasoning-gym task name (chain_sum, basic_arithmetic, gsm_symbolic)."""
    weight: float = 1.0
    """Relative share of the traces."""
    config: dict = field(default_factory=dict)
    """Options passed to the reasoning-gym task."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "s1k", "chat"] = "synthetic"
    """Training traces: generated offline with reasoning-gym, s1K-1.1 (schema of the hub set), or
    chat rows (a `messages` list of {role: system|user|assistant, content}, multi-turn allowed),
    formatted with the model's chat template, loss on every assistant turn."""
    path: Optional[str] = None
    """s1K-1.1 or chat rows as a local Parquet/JSONL file or a hub dataset id (source: s1k, chat)."""
    trajectory: Literal["deepseek", "gemini"] = "deepseek"
    """Which s1K-1.1 trajectory/attempt pair to train on."""
    num_traces: int = 400
    """Synthetic traces to generate (s1k, chat: the first N rows, 0 = all rows)."""
    tasks: list[TaskMix] = field(default_factory=lambda: [TaskMix()])
    """Mix of reasoning-gym tasks for synthetic traces."""
    hesitation_share: float = 0.35
    """Share of synthetic traces given R1-style markers (Wait, Hmm, double-checks, fixed slips)."""
    max_seq_len: int = 1024
    """Longest tokenized trace."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with longer traces (counted in the manifest either way)."""
    bad_rows: Literal["error", "skip"] = "error"
    """Malformed input rows: stop with an error naming file and row, or skip and count."""
    heldout_traces: int = 32
    """Traces kept out of training for held-out loss and KL ablations."""
    benchmarks: list[BenchmarkConfig] = field(default_factory=lambda: [BenchmarkConfig()])
    """Benchmarks to prepare for the evaluate stage."""

    def __post_init__(self) -> None:
        if self.source in ("s1k", "chat") and not self.path:
            raise ConfigError(f"data.path is required when data.source is {self.source!r}")
        if not 0.0 <= self.hesitation_share <= 1.0:
            raise ConfigError(f"data.hesitation_share must be in [0, 1], got {self.hesitation_share!r}")
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be >= 8, got {self.max_seq_len!r}")
        if self.num_traces < 0:
            raise ConfigError(f"data.num_traces must be >= 0, got {self.num_traces!r}")
        if self.source == "synthetic" and self.num_traces <= self.heldout_traces:
            raise ConfigError(
                f"data.num_traces ({self.num_traces}) must exceed data.heldout_traces ({self.heldout_traces})"
            )
        names = [b.name for b in self.benchmarks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"data.benchmarks: duplicate names {sorted(dup)}")


@dataclass
class PlanConfig:
    tokens: int = 10_000_000
    """Tokens the activation store is sized for (paper: s1K-1.1, ~10M)."""
    mlp_neurons: int = 60
    """Baseline neurons per MLP stored beside the adapter activations."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU for the per-stage estimate."""
    gpus_per_node: int = 8
    """GPUs per node for the per-stage estimate."""
    train_tokens_per_s: float = 20_000.0
    """Stated training throughput (all GPUs) for the time estimate."""
    extract_tokens_per_s: float = 60_000.0
    """Stated extraction throughput (all actors) for the time estimate."""


# --------------------------------------------------------------------------- stage sections
# One dataclass per stage. Each stage's owner keeps its fields here; every field has a
# docstring and __post_init__ rejects bad values with the dotted key in the message.


# The seven adapted matrices of a decoder layer, in the order components are named
# (`L{layer:02d}_{module}`) by every stage.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSection:
    """The adapter of the `train` stage. Paper: r=1, alpha 16, rsLoRA, all seven matrices of
    every layer (448 components on Qwen2.5-32B)."""

    r: int = 1
    """LoRA rank (paper: 1; each component is then one scalar per token)."""
    alpha: float = 16.0
    """LoRA alpha (paper: 16). Scaling is alpha/sqrt(r) with rsLoRA, alpha/r without."""
    use_rslora: bool = True
    """Rank-stabilised scaling alpha/sqrt(r) (paper: on)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES))
    """Adapted matrices of each layer, a subset of q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj (paper: all seven)."""
    layers: Optional[list[int]] = None
    """Decoder layers to adapt (0-based). None: every layer (paper). Checked against the
    model's layer count before any work starts."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"train.lora.r must be >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"train.lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("train.lora.target_modules must name at least one module")
        for m in self.target_modules:
            if m not in LORA_MODULES:
                raise ConfigError(
                    f"train.lora.target_modules: unknown module {m!r} (known: {', '.join(LORA_MODULES)})"
                )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"train.lora.target_modules has duplicates: {self.target_modules!r}")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("train.lora.layers must be null (every layer) or a non-empty list")
            bad = [i for i in self.layers if i < 0]
            if bad:
                raise ConfigError(f"train.lora.layers: layer index {bad[0]!r} is negative")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"train.lora.layers has duplicates: {self.layers!r}")


@dataclass
class FullSection:
    """What the `train_full` stage (full-parameter fine-tune) does differently; everything else
    (data, loss, batching, precision, workers) comes from `train`."""

    lr: float = 1e-5
    """Peak learning rate of the full fine-tune (s1: 1e-5; demo on SmolLM2: 3e-5)."""
    epochs: int = 5
    """Passes over the training traces (paper: 5)."""
    strategy: Optional[Literal["ddp", "deepspeed_zero2", "deepspeed_zero3"]] = None
    """Distribution strategy for the full fine-tune. None: train.strategy. Large models need
    deepspeed_zero3 here even when the adapter trains with ddp."""
    precision: Optional[Literal["auto", "float32", "bf16_autocast", "bf16"]] = None
    """Precision of the full fine-tune. None: train.precision (auto: bf16_autocast, or bf16 under
    DeepSpeed, where the hardware runs bf16 fast, else float32). The rank-1 adapter can train on
    a frozen bf16 base (as a GPU run does) while the full fine-tune keeps fp32 weights
    (bf16_autocast): bf16 weights would round its small Adam updates away."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.full.lr must be > 0, got {self.lr!r}")
        if self.epochs < 1:
            raise ConfigError(f"train.full.epochs must be >= 1, got {self.epochs!r}")


@dataclass
class Scaling:
    """How a trained stage (train, train_full, sae, transcoder) runs on Ray Train: the same
    keys, defaults and checks in each of their sections (`train.num_workers`,
    `sae.num_workers`, `transcoder.num_workers`, ...)."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks: gradients are averaged)."""
    cpus_per_worker: int = 2
    """CPUs per worker (also torch's thread count on CPU)."""
    gpus_per_worker: int = 0
    """GPUs per worker (0: CPU training with gloo; with GPUs, nccl)."""
    keep_checkpoints: int = 2
    """Ray Train checkpoints kept (the newest)."""
    max_failures: int = 2
    """Worker failures a run recovers from (from its last checkpoint); -1: unlimited."""

    def check_scaling(self, section: str) -> None:
        for name in ("num_workers", "cpus_per_worker", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{section}.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"{section}.gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")
        if self.max_failures < -1:
            raise ConfigError(f"{section}.max_failures must be >= -1, got {self.max_failures!r}")


@dataclass
class TrainConfig(Scaling):
    """Ray Train fine-tuning (rank-1 LoRA and the full fine-tune baseline).

    Paper defaults (Qwen2.5-32B on s1K-1.1): rank-1 LoRA, alpha 16, rsLoRA, lr 1e-3,
    5 epochs, all 7 matrices of every layer. The demo recipe on SmolLM2 (DESIGN.md): lr 1e-3,
    2 epochs, bf16_autocast; full fine-tune lr 3e-5, 1 epoch.
    """

    lr: float = 1e-3
    """Peak learning rate of the rank-1 LoRA (paper: 1e-3)."""
    epochs: int = 5
    """Passes over the training traces (paper: 5)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up, to 0 at the last step."""
    warmup_ratio: float = 0.05
    """Share of optimizer steps with a linear warm-up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    batch_tokens: int = 4096
    """Token budget of one micro-batch per worker, padding included: traces are grouped so
    that (traces x longest trace) stays within it; a longer trace goes alone."""
    grad_accum: int = 1
    """Micro-batches per worker per optimizer step."""
    precision: Literal["auto", "float32", "bf16_autocast", "bf16"] = "auto"
    """auto (bf16 where the hardware runs it fast: CUDA, a CPU with AMX or AVX512-BF16; float32
    elsewhere, where bf16 can be 70x slower; rank1_core/device.py); float32; bf16_autocast (fp32 weights, bf16 matmuls: 1.6x faster on CPU, used by the
    demo); bf16 (bf16 base weights; the adapter stays fp32; with DeepSpeed its bf16 mode)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    strategy: Literal["ddp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"
    """ddp (gloo on CPU, nccl on GPU) or DeepSpeed ZeRO-2/3 (also runs on CPU)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON. None: configs/deepspeed_zero2.json or _zero3.json of rank1. Values
    "auto" are filled from this section (batch, accumulation, clipping, bf16)."""
    checkpoint_every: int = 0
    """Optimizer steps between Ray Train checkpoints (0: at the end of every epoch)."""
    eval_every: int = 0
    """Optimizer steps between held-out losses (0: at the start and the end of every epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs). For smoke runs/benchmarks."""
    lora: LoraSection = field(default_factory=LoraSection)
    """The rank-1 adapter (stage `train`)."""
    adapter_path: Optional[str] = None
    """A local peft adapter directory (adapter_config.json + adapter_model.safetensors) made
    elsewhere, of any rank: the `train` stage checks it against the model (base model, target
    modules, layers, rank: a mismatch names the key), copies it to train/adapter and records
    its hash instead of training; `train.lora` is then not used. None: train one."""
    full: FullSection = field(default_factory=FullSection)
    """The full fine-tune baseline (stage `train_full`)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr!r}")
        self.check_scaling("train")
        for name in ("epochs", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "eval_every", "max_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.batch_tokens < 8:
            raise ConfigError(f"train.batch_tokens must be >= 8, got {self.batch_tokens!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ExtractConfig:
    """Per-token adapter activations and baseline MLP neurons to Parquet (Ray Data)."""

    actors: int = 2
    """Actors in the Ray Data pool; each loads the model and adapter once."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves."""
    gpus_per_actor: float = 0.0
    """GPUs each actor reserves (0: run on CPU)."""
    torch_threads: Optional[int] = None
    """torch intra-op threads per actor (None: cpus_per_actor rounded up)."""
    batch_docs: int = 16
    """Documents per Ray Data batch; each batch becomes one Parquet file per table."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass (a longer document runs alone)."""
    mlp_neurons: int = 60
    """Baseline: the first N neurons of every MLP of the unadapted model (paper: 60; 0 = none)."""
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    """Model dtype while extracting (None: model.dtype; auto: bfloat16 where fast). Stored values are float32 either way."""
    splits: list[str] = field(default_factory=lambda: ["train", "heldout"])
    """Which splits of prepare/tokens to extract."""
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    """Parquet compression of the output files."""

    def __post_init__(self) -> None:
        for name in ("actors", "batch_docs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extract.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError(
                f"extract.cpus_per_actor / extract.gpus_per_actor must be >= 0, got "
                f"{self.cpus_per_actor!r} / {self.gpus_per_actor!r}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"extract.torch_threads must be >= 1 or null, got {self.torch_threads!r}")
        if self.mlp_neurons < 0:
            raise ConfigError(f"extract.mlp_neurons must be >= 0, got {self.mlp_neurons!r}")
        bad = [s for s in self.splits if s not in ("train", "heldout")]
        if bad or not self.splits:
            raise ConfigError(f"extract.splits must be a non-empty subset of ['train', 'heldout'], got {self.splits!r}")


@dataclass
class TopkConfig:
    """Top-k activating contexts and per-feature statistics (DuckDB over Parquet)."""

    k: int = 64
    """Contexts per feature and sign (paper: 64)."""
    max_per_doc: int = 4
    """At most this many of a feature's top-k hits (per sign) from one document."""
    window_before: int = 24
    """Tokens of context before each hit."""
    window_after: int = 8
    """Tokens of context after each hit."""
    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources; None: every available one (adapter, neuron if extracted, sae if its
    stage is done). A source listed explicitly must be available."""
    active_threshold: float = 0.0
    """A token counts as active for a feature when its value exceeds this (stats.frac_active)."""
    memory_limit: str = "4GB"
    """DuckDB memory_limit; larger intermediate results spill to temp_dir."""
    threads: Optional[int] = None
    """DuckDB threads (None: DuckDB's default, all cores)."""
    temp_dir: Optional[str] = None
    """Local directory for DuckDB's database and spill files (None: the system temp dir)."""

    def __post_init__(self) -> None:
        for name in ("k", "max_per_doc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"topk.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("window_before", "window_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"topk.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.active_threshold < 0:
            raise ConfigError(f"topk.active_threshold must be >= 0, got {self.active_threshold!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"topk.threads must be >= 1 or null, got {self.threads!r}")
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("topk.sources must not be empty (null: every available source)")
            dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
            if dup:
                raise ConfigError(f"topk.sources lists {dup} twice")
        import re as _re

        if not _re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", self.memory_limit, _re.I):
            raise ConfigError(f"topk.memory_limit must look like '4GB' or '512MiB', got {self.memory_limit!r}")


@dataclass
class SAEConfig(Scaling):
    """Cross-layer BatchTopK sparse autoencoder over the whole adapter state."""

    expansion: int = 8
    """Latents per input column (paper: 8; 448 columns x 8 = 3,584 latents)."""
    k: int = 16
    """Average active latents per token (BatchTopK keeps k x batch activations per batch)."""
    normalize: Literal["column", "scalar", "none"] = "column"
    """Input normalisation fitted on the data: `column` standardises every component
    (mean 0, std 1) so each layer/module weighs the same in the loss, as crosscoders
    normalise each layer; `scalar` divides by one number so E||x||^2 = d (Gao/SAELens)."""
    norm_tokens: int = 1_000_000
    """Tokens read (from the start of the data) to fit the normalisation."""
    batch_size: int = 4096
    """Tokens per optimizer step, summed over workers (BatchTopK selects within a worker's share)."""
    epochs: int = 1
    """Passes over the activation Parquet."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (None: epochs x tokens // batch_size)."""
    lr: float = 5e-4
    """Adam learning rate (betas 0.9, 0.999)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_frac: float = 0.2
    """Final share of steps over which the learning rate decays linearly to 0."""
    aux_k: Optional[int] = None
    """Dead latents used by the AuxK loss per token (None: half the input width, as Gao et al.)."""
    aux_coef: float = 0.03125
    """Weight of the AuxK loss (Gao et al.: 1/32)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired over this many training tokens is dead (revived by AuxK;
    dead at the end of training = filtered from every output)."""
    threshold_ema: float = 0.01
    """Rate of the running estimate of the smallest kept activation, the inference threshold."""
    shuffle_buffer: int = 65_536
    """Tokens held in the local shuffle buffer while streaming (0: no shuffle)."""
    loader: Literal["ray_data", "pyarrow"] = "ray_data"
    """How workers stream the activation Parquet: a Ray Data dataset shard per worker
    (`iter_torch_batches`; the path for clusters), or each worker reading its share of the
    files with pyarrow (no Ray Data start-up per epoch: measured several seconds per epoch on
    2 cores, which dominates small data trained for many epochs)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (plus one at the end)."""
    encode_batch_size: int = 8192
    """Tokens per batch when encoding every token after training."""

    def __post_init__(self) -> None:
        self.check_scaling("sae")
        positive = ("expansion", "k", "norm_tokens", "batch_size", "epochs", "dead_tokens", "checkpoint_every",
                    "encode_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"sae.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "aux_k"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"sae.{name} must be >= 1 or null, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"sae.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"sae.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ConfigError(f"sae.decay_frac must be in [0, 1], got {self.decay_frac!r}")
        if self.aux_coef < 0:
            raise ConfigError(f"sae.aux_coef must be >= 0, got {self.aux_coef!r}")
        if not 0.0 < self.threshold_ema <= 1.0:
            raise ConfigError(f"sae.threshold_ema must be in (0, 1], got {self.threshold_ema!r}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"sae.shuffle_buffer must be >= 0, got {self.shuffle_buffer!r}")
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"sae.batch_size ({self.batch_size}) must be divisible by sae.num_workers ({self.num_workers})"
            )


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


@dataclass
class LLMModelConfig:
    """One LLM the autointerp stage can call: where it lives, its rate limits and its prices."""

    name: str = "gpt-5-mini"
    """Name used by autointerp.tasks, the limiter, the price table and the logs."""
    provider: Literal["openai", "anthropic"] = "openai"
    """'openai': the official openai SDK (OpenAI, or any OpenAI-compatible server via base_url,
    such as vLLM); 'anthropic': the official anthropic SDK."""
    model: Optional[str] = None
    """Model id sent to the provider (None: `name`)."""
    base_url: Optional[str] = None
    """Server address (None: the provider's public API)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key (keys are never put in configs)."""
    rpm: float = 500.0
    """Requests per minute allowed to all actors of a run together."""
    tpm: Optional[float] = 200_000.0
    """Tokens (prompt estimate + max output) per minute for all actors together (None: no limit)."""
    input_usd_per_mtok: float = 0.0
    """Price of a million prompt tokens, US dollars (the call log's cost and the budget)."""
    output_usd_per_mtok: float = 0.0
    """Price of a million output tokens, US dollars."""
    structured: bool = True
    """Send each answer's JSON schema (response_format / output_config) so answers parse."""
    schema_limits: bool = False
    """Add string/array length limits to the schemas (small local models; some hosted strict
    modes reject those keywords)."""
    temperature: Optional[float] = None
    """Sampling temperature (None: the provider's default; gpt-5 models accept only that)."""
    extra_output_tokens: int = 0
    """Added to every task's max_tokens for this model (reasoning models think first)."""
    params: dict = field(default_factory=dict)
    """Extra request parameters sent as they are (e.g. {reasoning_effort: low})."""
    timeout_s: float = 120.0
    """Seconds before a request counts as timed out (and is retried). The provider may still
    finish and bill the abandoned request: keep it above the slowest normal answer (docs/stages/autointerp.md)."""

    def __post_init__(self) -> None:
        where = f"autointerp.models[{self.name!r}]"
        if not self.name:
            raise ConfigError("autointerp.models: every model needs a non-empty 'name'")
        if self.rpm <= 0:
            raise ConfigError(f"{where}.rpm must be > 0, got {self.rpm!r}")
        if self.tpm is not None and self.tpm <= 0:
            raise ConfigError(f"{where}.tpm must be > 0 or null, got {self.tpm!r}")
        for k in ("input_usd_per_mtok", "output_usd_per_mtok", "extra_output_tokens"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{where}.{k} must be >= 0, got {getattr(self, k)!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"{where}.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"{where}.api_key_env must be an environment variable NAME, "
                              f"not a key (got a value of length {len(self.api_key_env)})")


@dataclass
class AutointerpTaskConfig:
    """Which model answers one task, and its output budget."""

    model: str = "gpt-5-mini"
    """Name of an entry of autointerp.models."""
    max_tokens: int = 300
    """Most output tokens of one answer (before the model's extra_output_tokens)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"autointerp.tasks.*.max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass
class AutointerpTasks:
    """Model per task (paper: gpt-5-mini explains, classifies and categorizes; claude-opus-4.1
    generates the categories)."""

    explain: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 300))
    """B.1: explanation + 0/1/2 classification of each feature."""
    categories: AutointerpTaskConfig = field(
        default_factory=lambda: AutointerpTaskConfig("claude-opus-4-1", 4000))
    """B.2: category generation, one call per category group."""
    categorize: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 50))
    """B.2: one category per feature."""
    score: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 200))
    """Detection scoring of each explanation (beyond the paper)."""


@dataclass
class LocalLLMServerConfig:
    """The local OpenAI-compatible vLLM server answering every task when no API key is set."""

    model: Optional[str] = None
    """Model to serve: a built-in name or a local HF directory (None: model.name, the run's
    instruct model)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Serving dtype (auto: bfloat16 where the hardware runs it fast, else float32). bfloat16 measured 3-5x faster than float32 here (SmolLM2, 2 busy cores:
    prefill 1,800 vs 356 tokens/s, decode 96-137 vs 35-53 tokens/s at 8 concurrent requests);
    its known crash needs prompts of <= 4 tokens, which chat prompts never are."""
    max_model_len: int = 8192
    """Longest prompt + answer in tokens (SmolLM2: up to 8192)."""
    kv_cache_gb: float = 1.0
    """KV-cache memory (vLLM otherwise reserves ~90% of RAM); SmolLM2 in bfloat16 needs
    ~23 KB per token, so 1 GB holds ~45k tokens (16 prompts of 2.8k)."""
    max_num_seqs: int = 16
    """Requests the engine batches at once."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for the server to answer (start-up is ~20-40 s)."""
    rpm: float = 100_000.0
    """Requests per minute (a local server needs no limit; concurrency bounds it)."""
    temperature: Optional[float] = 0.0
    """Sampling temperature (0: greedy, reproducible)."""
    max_tokens: int = 1024
    """Cap on any one answer's tokens (prompt + answer must fit max_model_len)."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm.entrypoints.openai.api_server` arguments."""

    def __post_init__(self) -> None:
        if self.max_model_len < 256:
            raise ConfigError(f"autointerp.local_server.max_model_len must be >= 256, got {self.max_model_len!r}")
        if self.kv_cache_gb <= 0:
            raise ConfigError(f"autointerp.local_server.kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"autointerp.local_server.max_num_seqs must be >= 1, got {self.max_num_seqs!r}")
        if not 1 <= self.max_tokens < self.max_model_len:
            raise ConfigError(f"autointerp.local_server.max_tokens must be in [1, max_model_len), "
                              f"got {self.max_tokens!r}")


AUTOINTERP_SOURCES = ("adapter", "neuron", "sae", "transcoder")


@dataclass
class AutointerpConfig:
    """LLM explanations, classifications, categories and scores (rate-limited actors)."""

    models: list[LLMModelConfig] = field(default_factory=lambda: [
        LLMModelConfig(name="gpt-5-mini", provider="openai", api_key_env="OPENAI_API_KEY",
                       rpm=500, tpm=200_000, input_usd_per_mtok=0.25, output_usd_per_mtok=2.0,
                       extra_output_tokens=2000),
        LLMModelConfig(name="claude-opus-4-1", provider="anthropic", api_key_env="ANTHROPIC_API_KEY",
                       rpm=50, tpm=30_000, input_usd_per_mtok=15.0, output_usd_per_mtok=75.0),
    ])
    """LLMs that can be called, with rate limits and the price table (USD per million tokens)."""
    tasks: AutointerpTasks = field(default_factory=AutointerpTasks)
    """Model and output budget per task."""
    use_local_server: Optional[bool] = None
    """Answer every task with a local vLLM server started by the stage. None: yes when no
    task's model has an API key in the environment or a base_url (resolved at run time and
    recorded in the stage's config, so setting a key later reruns with the hosted models)."""
    local_server: LocalLLMServerConfig = field(default_factory=LocalLLMServerConfig)
    """The local server's model and CPU settings."""
    sources: list[str] = field(default_factory=lambda: list(AUTOINTERP_SOURCES))
    """Feature sources to interpret: adapter components, baseline MLP neurons, SAE features."""
    signs: list[str] = field(default_factory=lambda: ["pos"])
    """Activation signs explained, each its own row ('neg': the most negative contexts)."""
    negative_fallback: bool = True
    """With signs [pos]: a feature that never activates positively (no positive contexts) has
    its negative side explained instead (sign 'neg'), so every component gets an explanation."""
    max_features: dict = field(default_factory=dict)
    """Cap per source, e.g. {neuron: 64} (missing or 0: all); the cap keeps the features with
    the largest max activation (topk/stats.parquet)."""
    neurons_per_layer: int = 0
    """Baseline neurons interpreted per MLP: the first N of every layer (neuron index < N), as
    the paper takes the first 60. 0: every neuron the extract stage wrote (extract.mlp_neurons)."""
    explain_contexts: int = 64
    """Top contexts shown per feature for the explanation (paper: 64)."""
    listed_tokens: int = 8
    """Tokens listed with their 0-10 strength under each context (strongest first)."""
    max_prompt_tokens: int = 12_000
    """Estimated prompt size cap: contexts are dropped from the weak end to fit."""
    categorize_contexts: int = 5
    """Contexts shown with the explanation when assigning a category."""
    score_positives: int = 5
    """Held-out activating contexts (ranks after the explanation's) per detection prompt."""
    score_negatives: int = 5
    """Non-activating contexts per detection prompt: other features' contexts not overlapping
    any of this feature's top contexts."""
    scorers: list[str] = field(default_factory=lambda: ["detection", "fuzzing", "simulation"])
    """Explanation scores computed (one call per feature each; see rank1_core/autointerp/scorers.py):
    detection (held-out vs other contexts), fuzzing (held-out contexts with right or random
    tokens marked; score_positives contexts), simulation (0-10 per token, correlation with the
    true activations on the held-out activating contexts)."""
    simulation_tokens: int = 16
    """Tokens per context the simulator predicts (a window around the context's hit)."""
    category_groups: dict = field(default_factory=lambda: {"directions": ["adapter", "neuron"], "sae": ["sae"],
                                                           "transcoder": ["transcoder"]})
    """Sources sharing one generated category set (paper: LoRA directions with MLP neurons;
    SAE features apart)."""
    category_max_features: int = 200
    """Explanations shown to the category generator per group, equal numbers per source."""
    budget_usd: Optional[float] = 10.0
    """Spending cap of the stage in US dollars (None: no cap). The stage stops before a call
    could pass it and keeps what is done; a resumed run counts what was spent before."""
    actors: int = 1
    """Ray worker actors (async; they share one limiter actor). 0: run in the driver, no Ray."""
    concurrency: int = 16
    """Requests in flight per actor."""
    burst_s: float = 1.0
    """Seconds of rate a limiter lets through at once."""
    retry_max_attempts: int = 6
    """Tries per request on 429 / 5xx / timeouts, the first included."""
    retry_base_s: float = 1.0
    """First backoff; doubles per try, with jitter; Retry-After is honoured."""
    retry_max_s: float = 60.0
    """Longest single wait."""
    cache_dir: Optional[str] = None
    """Cache of every request and answer (a path or pyarrow URI; None: $RANK1_CACHE/llm, i.e.
    ~/.cache/rank1/llm). Shared by runs: a rerun never pays for an answer it has."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"autointerp.models: duplicate names {dup}")
        for task in ("explain", "categories", "categorize", "score"):
            m = getattr(self.tasks, task).model
            if m not in names:
                raise ConfigError(f"autointerp.tasks.{task}.model {m!r} is not in autointerp.models ({names})")
        bad = [s for s in self.sources if s not in AUTOINTERP_SOURCES]
        if bad or not self.sources:
            raise ConfigError(f"autointerp.sources must be a non-empty subset of {list(AUTOINTERP_SOURCES)}, "
                              f"got {self.sources!r}")
        if not self.signs or any(s not in ("pos", "neg") for s in self.signs):
            raise ConfigError(f"autointerp.signs must be a non-empty subset of ['pos', 'neg'], got {self.signs!r}")
        for src, cap in self.max_features.items():
            if src not in AUTOINTERP_SOURCES:
                raise ConfigError(f"autointerp.max_features: unknown source {src!r} (known: {list(AUTOINTERP_SOURCES)})")
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ConfigError(f"autointerp.max_features.{src} must be an integer >= 0, got {cap!r}")
        if isinstance(self.neurons_per_layer, bool) or not isinstance(self.neurons_per_layer, int) \
                or self.neurons_per_layer < 0:
            raise ConfigError(f"autointerp.neurons_per_layer must be an integer >= 0, got {self.neurons_per_layer!r}")
        seen: dict[str, str] = {}
        for group, srcs in self.category_groups.items():
            if not isinstance(srcs, list) or not srcs or any(s not in AUTOINTERP_SOURCES for s in srcs):
                raise ConfigError(f"autointerp.category_groups.{group} must be a non-empty list of sources "
                                  f"from {list(AUTOINTERP_SOURCES)}, got {srcs!r}")
            for s in srcs:
                if s in seen:
                    raise ConfigError(f"autointerp.category_groups: source {s!r} is in both {seen[s]!r} and {group!r}")
                seen[s] = group
        for k in ("explain_contexts", "listed_tokens", "categorize_contexts", "category_max_features",
                  "concurrency", "retry_max_attempts", "max_prompt_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"autointerp.{k} must be >= 1, got {getattr(self, k)!r}")
        for k in ("score_positives", "score_negatives", "actors"):
            if getattr(self, k) < 0:
                raise ConfigError(f"autointerp.{k} must be >= 0, got {getattr(self, k)!r}")
        from rank1_core.autointerp.scorers import SCORERS

        if any(s not in SCORERS for s in self.scorers) or len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"autointerp.scorers must be distinct names from {list(SCORERS)}, got {self.scorers!r}")
        if self.simulation_tokens < 2:
            raise ConfigError(f"autointerp.simulation_tokens must be >= 2, got {self.simulation_tokens!r}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ConfigError(f"autointerp.budget_usd must be >= 0 or null, got {self.budget_usd!r}")
        if self.burst_s <= 0 or self.retry_base_s < 0 or self.retry_max_s <= 0:
            raise ConfigError("autointerp.burst_s and autointerp.retry_max_s must be > 0, "
                              f"autointerp.retry_base_s >= 0 (got {self.burst_s!r}, {self.retry_max_s!r}, "
                              f"{self.retry_base_s!r})")

    def model(self, name: str) -> LLMModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class ReportConfig:
    """Tables, figures and HTML feature dashboards of whatever stages of a run are done."""

    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources with dashboards (None: every source the run has)."""
    contexts: int = 64
    """Top contexts shown per feature and sign (paper: 64; at most topk.k exist)."""
    context_before: Optional[int] = None
    """Tokens shown before each hit (None: the whole window the topk stage stored)."""
    context_after: Optional[int] = None
    """Tokens shown after each hit (None: the whole stored window)."""
    trace_max_tokens: int = 2048
    """Longest whole trace on a feature page; a longer document is cut to a window of this
    many tokens around the feature's top hit (the page says so)."""
    histogram_bins: int = 40
    """Bins of each feature's activation histogram."""
    sample_tokens: int = 2_000_000
    """Tokens read (first files first) for the histograms and Figure 3's category densities
    (0: every token; the paper used a subset of the training data)."""
    max_features: int = 0
    """At most this many feature pages per source: explained features (and selected transcoder
    hesitation features) first, then the rest, in catalogue order (0: every feature)."""
    figure_dpi: int = 130
    """Resolution of the PNG figures."""

    def __post_init__(self) -> None:
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("report.sources must not be empty (null: every available source)")
            dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
            if dup:
                raise ConfigError(f"report.sources lists {dup} twice")
        for name in ("contexts", "trace_max_tokens", "figure_dpi"):
            if getattr(self, name) < 1:
                raise ConfigError(f"report.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.histogram_bins < 2:
            raise ConfigError(f"report.histogram_bins must be >= 2, got {self.histogram_bins!r}")
        for name in ("sample_tokens", "max_features"):
            if getattr(self, name) < 0:
                raise ConfigError(f"report.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("context_before", "context_after"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"report.{name} must be >= 0 or null, got {v!r}")


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


TRANSCODER_SUBSECTIONS = ("extract", "hesitation", "eval")


@dataclass
class TranscoderExtractSection:
    """Stage `transcoder_extract`: every token's adapter features, in the SAE's sparse layout."""

    splits: list[str] = field(default_factory=lambda: ["train", "heldout"])
    """Splits of prepare/tokens to encode; keep them equal to extract.splits, so topk's token
    table (extract/tokens) covers exactly the tokens the features were measured on."""
    actors: int = 1
    """Ray Data actors; each loads the base model and the adapters once."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves."""
    torch_threads: Optional[int] = None
    """torch threads per actor (None: cpus_per_actor rounded up)."""
    batch_docs: int = 16
    """Documents per Ray Data batch (one Parquet file per batch)."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass."""

    def __post_init__(self) -> None:
        for name in ("actors", "batch_docs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transcoder.extract.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"transcoder.extract.cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"transcoder.extract.torch_threads must be >= 1 or null, got {self.torch_threads!r}")
        bad = [s for s in self.splits if s not in ("train", "heldout")]
        if bad or not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError("transcoder.extract.splits must be a non-empty subset of ['train', 'heldout'], "
                              f"got {self.splits!r}")


@dataclass
class TranscoderHesitationSection:
    """Which adapter features count as hesitation features (their top contexts are hesitation
    tokens), for the ablation experiment of stage `transcoder_eval`."""

    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Hesitation words (default: `rank1_core.lexicon.HESITATION_WORDS`); a token matches when its
    letters, lower-cased, equal one of them; `transcoder_eval` counts them in generated text
    whole-word and case-insensitively (the lexicon's one rule, as `steer`)."""
    match: Literal["token", "next", "either"] = "either"
    """A top context counts when the token at the hit is a hesitation word (token), the token
    after it is (next: the feature fires where the model is about to hesitate), or either."""
    contexts: int = 16
    """Top positive contexts per feature inspected (at most one per document)."""
    min_share: float = 0.5
    """A feature is a hesitation feature when at least this share of its top contexts match."""
    min_contexts: int = 4
    """...and it has at least this many top contexts (rarely firing features are left out)."""
    max_features: int = 0
    """Ablate at most this many (the highest shares first; 0: every one found)."""
    random_control: bool = True
    """Also ablate as many random live non-hesitation features (seeded): a control variant."""

    def __post_init__(self) -> None:
        if not self.words or any(not any(c.isalpha() for c in w) for w in self.words):
            raise ConfigError(f"transcoder.hesitation.words must be non-empty words, got {self.words!r}")
        if not 1 <= self.contexts <= 1000:
            raise ConfigError(f"transcoder.hesitation.contexts must be in [1, 1000], got {self.contexts!r}")
        if not 0.0 < self.min_share <= 1.0:
            raise ConfigError(f"transcoder.hesitation.min_share must be in (0, 1], got {self.min_share!r}")
        if not 1 <= self.min_contexts <= self.contexts:
            raise ConfigError(f"transcoder.hesitation.min_contexts must be in [1, contexts={self.contexts}], "
                              f"got {self.min_contexts!r}")
        if self.max_features < 0:
            raise ConfigError(f"transcoder.hesitation.max_features must be >= 0, got {self.max_features!r}")


@dataclass
class TranscoderEvalSection:
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transcoder.eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.limit < 0:
            raise ConfigError(f"transcoder.eval.limit must be >= 0, got {self.limit!r}")
        if self.actor_cpus <= 0:
            raise ConfigError(f"transcoder.eval.actor_cpus must be > 0, got {self.actor_cpus!r}")
        if self.threads < 0:
            raise ConfigError(f"transcoder.eval.threads must be >= 0, got {self.threads!r}")


@dataclass
class TranscoderConfig(Scaling):
    """Transcoder adapters (paper/transcoder-adapters-abstract.md): per MLP layer a sparse branch
    reading the MLP's input, TopK(k) over expansion x hidden latents, whose output is added to
    the frozen base MLP's output; trained (stage `transcoder`) so that base + adapters matches
    a fine-tuned target: each MLP's reconstruction + KL of the next-token distribution + a
    sparsity term. Stages transcoder_extract and transcoder_eval read the subsections below;
    a change there does not retrain the adapters."""

    target: str = "train_full"
    """The fine-tuned model of the pair: `train_full` (that stage's model) or a model
    directory / built-in name. The base is model.name."""
    layers: Optional[list[int]] = None
    """Decoder layers given an adapter (0-based). None: every layer."""
    expansion: int = 4
    """Latents per layer = expansion x hidden size."""
    k: int = 32
    """Active latents per token and layer (TopK)."""
    recon: Literal["difference", "output"] = "difference"
    """Reconstruction target of a layer's branch: `difference` = target MLP minus base MLP on
    the adapted model's own MLP input; `output` = the target model's MLP output (in its own
    forward) minus the base MLP's. Both normalised by the target's variance (an FVU)."""
    positions: Literal["all", "assistant"] = "all"
    """Tokens the losses cover: every token, or only the assistant turn (loss_mask)."""
    recon_coef: float = 1.0
    """Weight of the mean per-layer normalised reconstruction error."""
    kl_coef: float = 1.0
    """Weight of KL(target || base + adapters) of the next-token distribution (nats per token)."""
    sparsity_coef: float = 0.0
    """Weight of the sparsity term: mean over tokens of sum over layers and active latents of
    z_i * ||W_dec[i]|| in each branch's normalised units (TopK already bounds L0; this shrinks
    what the active latents write)."""
    init_tokens: int = 8192
    """Training tokens used before step 0 to fit each branch's normalisation: its input's mean and
    RMS, and the RMS of the MLP difference it learns (its output scale)."""
    lr: float = 1e-3
    """Adam learning rate (peak)."""
    epochs: int = 1
    """Passes over the training traces."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: every epoch)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up, to 0 at the last step."""
    warmup_ratio: float = 0.05
    """Share of steps with a linear warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    batch_tokens: int = 2048
    """Padded tokens of one micro-batch per worker (traces x longest trace)."""
    grad_accum: int = 1
    """Micro-batches per worker per optimizer step."""
    precision: Literal["auto", "float32", "bf16_autocast"] = "auto"
    """Matmuls of both models' forward passes (weights, adapters and losses stay fp32)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (0: at the end of every epoch)."""
    heldout_docs: int = 0
    """Held-out traces the faithfulness numbers are measured on (0: all)."""
    extract: TranscoderExtractSection = field(default_factory=TranscoderExtractSection)
    """Stage transcoder_extract."""
    hesitation: TranscoderHesitationSection = field(default_factory=TranscoderHesitationSection)
    """Hesitation features (found by transcoder_extract, ablated by transcoder_eval)."""
    eval: TranscoderEvalSection = field(default_factory=TranscoderEvalSection)
    """Stage transcoder_eval."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ConfigError("transcoder.target must be 'train_full' or a model directory, got ''")
        self.check_scaling("transcoder")
        for name in ("expansion", "k", "epochs", "batch_tokens", "grad_accum", "init_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transcoder.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "checkpoint_every", "heldout_docs", "recon_coef", "kl_coef", "sparsity_coef",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"transcoder.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.recon_coef == 0 and self.kl_coef == 0:
            raise ConfigError("transcoder.recon_coef and transcoder.kl_coef are both 0: nothing to train on")
        if not self.lr > 0:
            raise ConfigError(f"transcoder.lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"transcoder.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("transcoder.layers must be null (every layer) or a non-empty list")
            if any(i < 0 for i in self.layers):
                raise ConfigError(f"transcoder.layers: negative layer index in {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"transcoder.layers has duplicates: {self.layers!r}")


@dataclass
class LexicalConcept:
    """A concept defined by words or a regular expression over the decoded text (any data)."""

    name: str = ""
    """Concept name (unique among all concepts)."""
    words: list[str] = field(default_factory=list)
    """Words matched whole-word (the rule of `rank1_core.lexicon`)."""
    regex: Optional[str] = None
    """A Python regular expression instead of `words`; every token overlapping a match is labelled."""
    case_sensitive: bool = False
    """Match case-sensitively (words and regex); the lexicon's rule is case-insensitive."""

    def __post_init__(self) -> None:
        import re as _re

        if not self.name or not _re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ConfigError(f"concepts.lexical: name must be an identifier, got {self.name!r}")
        if bool(self.words) == (self.regex is not None):
            raise ConfigError(f"concepts.lexical: concept {self.name!r} needs exactly one of words or regex")
        if self.regex is not None:
            try:
                _re.compile(self.regex)
            except _re.error as e:
                raise ConfigError(f"concepts.lexical: concept {self.name!r}: regex {self.regex!r} does not compile "
                                  f"({e})") from None
        if any(not w for w in self.words):
            raise ConfigError(f"concepts.lexical: concept {self.name!r} has an empty word")


@dataclass
class SQLConcept:
    """A concept defined by SQL: a query over the run's views (`tokens`, ...) returning the
    (doc_id, pos) rows of the concept."""

    name: str = ""
    """Concept name (unique among all concepts)."""
    query: str = ""
    """A query of `queries/` by name (`concept_after_equals`) or a path to a .sql file."""

    def __post_init__(self) -> None:
        import re as _re

        if not self.name or not _re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ConfigError(f"concepts.sql: name must be an identifier, got {self.name!r}")
        if not self.query:
            raise ConfigError(f"concepts.sql: concept {self.name!r} needs a query (a name in queries/ or a file)")


@dataclass
class ConceptsConfig:
    """Ground truth: token-level concept labels (planted by the synthetic generator, lexical,
    SQL) and, for every feature x concept, AUROC and top-k precision against random
    directions and shuffled labels (stage `concepts`)."""

    planted: bool = True
    """Use prepare's spans (the synthetic generator's planted concepts and the think/answer
    sections) when prepare wrote them."""
    lexical: list[LexicalConcept] = field(default_factory=lambda: [
        LexicalConcept(name="hesitation_word", words=list(HESITATION_WORDS)),
        LexicalConcept(name="number", regex=r"[0-9]+"),
        LexicalConcept(name="newline", regex=r"\n"),
    ])
    """Lexical concepts, for any data (s1K-1.1 included)."""
    sql: list[SQLConcept] = field(default_factory=lambda: [
        SQLConcept(name="after_equals", query="concept_after_equals")])
    """SQL concepts: queries returning (doc_id, pos)."""
    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources; None: every available one (as topk)."""
    k: int = 64
    """Top contexts per feature and sign whose peak tokens give the precision (paper: 64)."""
    max_per_doc: int = 4
    """At most this many of those contexts from one document (as topk.max_per_doc)."""
    clean_auroc: float = 0.9
    """A feature is clean when its best concept's AUROC reaches this ..."""
    clean_precision: float = 0.8
    """... and that concept's top-k precision reaches this."""
    broad_auroc: float = 0.75
    """Not clean but best AUROC at least this: broad; below: unmatched."""
    best_excludes: list[str] = field(default_factory=lambda: ["think", "answer"])
    """Concepts never chosen as a feature's best concept (whole sections: a feature that fires
    anywhere in the thinking is not a detector of anything). Their scores are still written."""
    random_directions: int = 16
    """Control: random unit directions in the adapter's activation space, scored like components."""
    bootstrap: int = 200
    """Bootstrap replicates over documents for the aggregate shares (0: none)."""
    bootstrap_blocks: int = 50
    """Documents are resampled in this many random blocks (at most one document per block)."""
    hist_bits: int = 16
    """Histogram resolution of the AUROC: the leading bits of each float32 value (16: 65,536
    bins, 7 mantissa bits); each AUROC carries its exact error bound."""
    memory_mb: int = 512
    """Feature values held at once (a pass reads as many columns / sparse rows as fit)."""
    keywords: dict = field(default_factory=dict)
    """Explanation keywords per concept ({concept: [words]}), added to the built-in lists of
    `rank1_core.concepts.KEYWORDS`: an explanation names a concept when it contains one."""
    seed: int = 0
    """Seed of the random directions, shuffled labels and bootstrap."""

    def __post_init__(self) -> None:
        for name in ("k", "max_per_doc", "hist_bits", "memory_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"concepts.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 8 <= self.hist_bits <= 24:
            raise ConfigError(f"concepts.hist_bits must be in [8, 24], got {self.hist_bits!r}")
        for name in ("random_directions", "bootstrap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"concepts.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bootstrap_blocks < 2:
            raise ConfigError(f"concepts.bootstrap_blocks must be >= 2, got {self.bootstrap_blocks!r}")
        for name in ("clean_auroc", "clean_precision", "broad_auroc"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"concepts.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.broad_auroc > self.clean_auroc:
            raise ConfigError(f"concepts.broad_auroc ({self.broad_auroc}) must not exceed concepts.clean_auroc "
                              f"({self.clean_auroc})")
        names = [c.name for c in self.lexical] + [c.name for c in self.sql]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"concepts: concept name(s) {dup} defined twice")
        if len(names) > 40:
            raise ConfigError(f"concepts: at most 40 lexical + SQL concepts, got {len(names)}")
        bad = {k: v for k, v in self.keywords.items() if not isinstance(v, list) or not all(isinstance(w, str) for w in v)}
        if bad:
            raise ConfigError(f"concepts.keywords must map a concept to a list of words, got {bad!r}")
        if self.sources is not None and not self.sources:
            raise ConfigError("concepts.sources must not be empty (null: every available source)")


# --------------------------------------------------------------------------- root


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


# Sections each stage's output depends on: its config hash covers these (plus the hashes of
# its inputs, which the run directory chains), so changing `report` never retrains.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("model", "data"),
    "train": ("model", "data", "train"),
    "train_full": ("model", "data", "train"),
    "evaluate": ("model", "evaluate"),
    "ablate": ("model", "ablate"),
    "extract": ("model", "extract"),
    "topk": ("topk",),
    "sae": ("sae",),
    "autointerp": ("autointerp",),
    "report": ("report",),
    "transcoder": ("model", "transcoder"),
    "transcoder_extract": ("model", "transcoder"),
    "transcoder_eval": ("model", "evaluate", "transcoder"),
    "steer": ("model", "steer"),
    "concepts": ("concepts",),
}


def register_stage(name: str, sections: tuple[str, ...]) -> None:
    STAGE_SECTIONS[name] = sections


# --------------------------------------------------------------------------- loading


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


def _from_dict(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        k = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if k in RENAMED_KEYS:
            raise ConfigError(f"{where}: '{k}' was replaced by {RENAMED_KEYS[k]}")
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
        if named and (named == key or named.startswith((f"{key}.", f"{key}["))):
            return ConfigError(f"override {ov!r}: {body}")
    return err


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "<dict>") -> Config:
    data = json.loads(json.dumps(data))  # deep copy, plain types only
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value, f"override {ov!r}")
    try:
        cfg = _from_dict(Config, data, "", where)
        unknown = [s for s in cfg.stages if s not in STAGE_SECTIONS]
        if unknown:
            raise ConfigError(f"{where}: 'stages' names unknown stage {unknown[0]!r} "
                              f"(known: {', '.join(STAGE_SECTIONS)})")
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
    """Hash of what the stage's own output depends on (not the run dir, not Ray)."""
    sections = STAGE_SECTIONS[stage]
    payload = {s: dataclasses.asdict(getattr(cfg, s)) for s in sections}
    payload["seed"] = cfg.run.seed
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
