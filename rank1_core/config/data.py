"""Config sections of the run, the cluster, the model and the data (stage prepare)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rank1_core.config.errors import ConfigError


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
