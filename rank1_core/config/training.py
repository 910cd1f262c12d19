"""Config sections of the trained stages: train / train_full (rank-1 LoRA, full fine-tune), sae,
transcoder, and the Ray Train scaling they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rank1_core.config.errors import ConfigError


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
class TranscoderConfig(Scaling):
    """Transcoder adapters (paper/transcoder-adapters-abstract.md): per MLP layer a sparse branch
    reading the MLP's input, TopK(k) over expansion x hidden latents, whose output is added to
    the frozen base MLP's output; trained (stage `transcoder`) so that base + adapters matches
    a fine-tuned target: each MLP's reconstruction + KL of the next-token distribution + a
    sparsity term. Stages transcoder_extract and transcoder_eval have sections of their own."""

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
