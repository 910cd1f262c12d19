"""The training loop of the `train` (rank-1 LoRA) and `train_full` (full fine-tune) stages.

Plain functions and small classes, no Ray: `ray_jobs/train.py` runs them inside Ray Train
workers, the tests and the benchmark call them directly.

- Data: `load_docs` reads `prepare/tokens` (one split); `plan_microbatches` groups traces into
  micro-batches under a token budget (traces x longest trace <= `train.batch_tokens`), shuffled
  per epoch from the seed; `plan_steps` deals them to workers and accumulation slots.
- Loss: cross-entropy on the tokens whose `loss_mask` is 1 (the assistant turn), summed and
  divided by the number of such tokens in the whole optimizer step (all workers, all
  accumulation slots), so gradient accumulation and data parallelism give the same gradient
  as one big batch.
- `Engine`: one interface over the three strategies: plain torch (one process), DDP, and
  DeepSpeed ZeRO-2/3; the objective `rank1_core.harness` trains (forward/backward, the
  optimizer step, the held-out loss, checkpoints and the final export: peft adapter or
  Hugging Face model directory).
- `DocSteps`: the token traces as the harness's step source (the transcoder trains on it too);
  `train_loop`: the harness over an engine; `job`: the whole stage's training for a worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from rank1_core import harness
from rank1_core.config import TrainConfig
from rank1_core.rundir import atomic_dir, atomic_local_path
from rank1_core.harness import (STATE_FILE, Micro, Plan, TorchOptimizer, TrainError, TrainState,  # noqa: F401
                                load_checkpoint, save_checkpoint)

MODES = ("lora", "full")
ENGINE_FILE = "engine.pt"
DS_TAG = "ds"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "heldout_loss", "wall")


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """What differs between the two stages, resolved from `TrainConfig`."""

    mode: str
    lr: float
    epochs: int
    strategy: str


def for_mode(cfg: TrainConfig, mode: str) -> TrainConfig:
    """The train section as the stage of `mode` runs it: `train.full.precision`, when set,
    replaces `train.precision` for the full fine-tune."""
    if mode == "full" and cfg.full.precision is not None and cfg.full.precision != cfg.precision:
        return replace(cfg, precision=cfg.full.precision)
    return cfg


def settings(cfg: TrainConfig, mode: str) -> Settings:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "lora":
        return Settings(mode, cfg.lr, cfg.epochs, cfg.strategy)
    return Settings(mode, cfg.full.lr, cfg.full.epochs, cfg.full.strategy or cfg.strategy)


# --------------------------------------------------------------------------- data


@dataclass
class Doc:
    doc_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def n(self) -> int:
        return len(self.input_ids)

    @property
    def loss_tokens(self) -> int:
        """Tokens predicted with loss: positions t >= 1 whose loss_mask is 1."""
        return int(self.loss_mask[1:].sum())


def load_docs(fs, path: str, split: str) -> list[Doc]:
    """Traces of one split ('train' | 'heldout') from `prepare/tokens`, by doc_id."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ds = pads.dataset(path, filesystem=fs, format="parquet")
    t = ds.to_table(columns=["doc_id", "input_ids", "loss_mask"], filter=pc.field("split") == split)
    t = t.sort_by("doc_id")
    ids = t.column("input_ids").to_pylist()
    masks = t.column("loss_mask").to_pylist()
    return [Doc(int(d), np.asarray(i, dtype=np.int64), np.asarray(m, dtype=np.int8))
            for d, i, m in zip(t.column("doc_id").to_pylist(), ids, masks)]


def plan_microbatches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int,
                      shuffle: bool = True, window: int = 64) -> list[list[int]]:
    """Indices of traces grouped into micro-batches of at most `batch_tokens` padded tokens.

    Shuffled from (seed, epoch); within windows of `window` traces, sorted by length so that
    a micro-batch holds traces of similar length (little padding). A trace longer than the
    budget forms a micro-batch alone. The micro-batch order is shuffled again.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    chunks = [order[i:i + window] for i in range(0, n, window)]
    order = np.concatenate([c[np.argsort([lengths[j] for j in c], kind="stable")] for c in chunks]) if n else order
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for j in order.tolist():
        m = max(longest, lengths[j])
        if cur and m * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, m = [], lengths[j]
        cur.append(j)
        longest = m
    if cur:
        batches.append(cur)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[k] for k in perm]
    return batches


def plan_steps(microbatches: list[list[int]], world_size: int, grad_accum: int) -> list[list[list[int]]]:
    """Optimizer steps, each the `world_size * grad_accum` micro-batches it consumes.

    Worker r takes micro-batches r, r + world_size, ... of a step. Micro-batches that do not
    fill a last whole step are left out of this epoch (the next epoch's shuffle differs).
    """
    per_step = world_size * grad_accum
    n = len(microbatches) // per_step
    if n == 0:
        raise TrainError(
            f"{len(microbatches)} micro-batches are too few for {world_size} worker(s) x {grad_accum} "
            "accumulation step(s): lower train.batch_tokens, train.grad_accum or train.num_workers"
        )
    return [microbatches[k * per_step:(k + 1) * per_step] for k in range(n)]


class DocBatch(NamedTuple):
    """One micro-batch of traces (see `collate`), on the CPU."""

    input_ids: object
    attention_mask: object
    labels: object
    step_loss_tokens: int
    """Loss tokens of the whole optimizer step (all workers, all accumulation slots)."""


@dataclass
class DocSteps:
    """Token traces as a step source of `rank1_core.harness`: per epoch, micro-batches under
    `batch_tokens` shuffled from (seed, epoch) (`plan_microbatches`), dealt to `world`
    workers and `grad_accum` accumulation slots (`plan_steps`); worker `rank` collates its own."""

    docs: list[Doc]
    batch_tokens: int
    grad_accum: int
    seed: int
    pad_id: int
    rank: int = 0
    world: int = 1

    def plan(self, epoch: int) -> list[list[list[int]]]:
        mbs = plan_microbatches([d.n for d in self.docs], self.batch_tokens, self.seed, epoch)
        return plan_steps(mbs, self.world, self.grad_accum)

    def total(self, epochs: int, max_steps: int = 0) -> int:
        """Optimizer steps of `epochs` epochs, at most `max_steps` (0: no limit)."""
        n = sum(len(self.plan(e)) for e in range(epochs))
        return min(n, max_steps) if max_steps else n

    def epoch(self, epoch: int, start: int) -> tuple[int, Iterator[list[Micro]]]:
        steps = self.plan(epoch)

        def micros() -> Iterator[list[Micro]]:
            for mbs in steps[start:]:
                loss_tokens = sum(self.docs[i].loss_tokens for mb in mbs for i in mb)
                yield [Micro(DocBatch(*collate([self.docs[i] for i in mb], self.pad_id), loss_tokens),
                             sum(self.docs[i].n for i in mb)) for mb in mbs[self.rank::self.world]]

        return len(steps), micros()


def collate(docs: Sequence[Doc], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, and labels (the next token where its
    loss_mask is 1, else -100), so that logits[:, t] is scored against labels[:, t]."""
    import torch

    T = max(d.n for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(docs), T), dtype=torch.long)
    labels = torch.full((len(docs), T), -100, dtype=torch.long)
    for b, d in enumerate(docs):
        x = torch.from_numpy(d.input_ids)
        ids[b, :d.n] = x
        att[b, :d.n] = 1
        nxt = x[1:].clone()
        nxt[torch.from_numpy(d.loss_mask[1:]) == 0] = -100
        labels[b, :d.n - 1] = nxt
    return ids, att, labels


def masked_ce_sum(logits, labels):
    """(sum of cross-entropy over labelled positions, number of labelled positions): the
    reference for `LossModel`, from full logits."""
    import torch.nn.functional as F

    v = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def _loss_model_class():
    import torch
    import torch.nn.functional as F

    class LossModel(torch.nn.Module):
        """A causal LM (or peft model) whose forward returns the summed cross-entropy over the
        labelled positions and their count. The output projection runs only on those
        positions: with a 49k-152k vocabulary the full logits dominate time and memory while
        the prompt and the padding carry no loss. DDP and DeepSpeed wrap this module."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def hf(self):
            m = self.model
            return m.get_base_model() if hasattr(m, "get_base_model") else m

        def forward(self, input_ids, attention_mask, labels):
            hf = self.hf()
            h = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            sel = labels != -100
            logits = hf.get_output_embeddings()(h[sel])
            loss = F.cross_entropy(logits.float(), labels[sel], reduction="sum")
            return loss, sel.sum()

    return LossModel


def loss_model(model):
    """Wrap a causal LM (or peft model) as a `LossModel` (see `_loss_model_class`)."""
    return _loss_model_class()(model)


# --------------------------------------------------------------------------- model


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr for the step with 0-based index `s`."""
    warmup = int(round(warmup_ratio * total_steps))

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        p = (s - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - p)
        return 1.0

    return f


def build_model(model_dir: str | Path, cfg: TrainConfig, mode: str, num_layers: int, seed: int,
                zero3_config: Optional[dict] = None):
    """The model to train: the base with a fresh peft adapter (lora), or the base itself (full).

    With a ZeRO-3 DeepSpeed config, the weights are partitioned while they load (transformers'
    `HfDeepSpeedConfig` -> `deepspeed.zero.Init`), so no worker ever holds the whole model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rank1_core.lora import peft_lora_config

    if cfg.precision == "auto":  # resolved by the config loader (rank1_core/device.py)
        raise ValueError("train.precision 'auto' reached the trainer unresolved: load the config with "
                         "rank1_core.config.load_config / config_from_dict")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    hf_ds = None
    if zero3_config is not None:
        from rank1_core.device import set_torch_extensions_dir

        set_torch_extensions_dir()  # per CPU kind: DeepSpeed builds its ops -march=native
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()  # adopts the torch.distributed group Ray Train set up
        hf_ds = HfDeepSpeedConfig(zero3_config)  # must stay alive while the model loads
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model._rank1_hf_ds = hf_ds
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import get_peft_model

        torch.manual_seed(seed)  # lora_A's initialisation
        model = get_peft_model(model, peft_lora_config(cfg.lora, num_layers))
    model.train()
    return model


def deepspeed_config(cfg: TrainConfig, strategy: str, world_size: int) -> dict:
    """The DeepSpeed JSON of the strategy with its "auto" values filled from `cfg`."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else CONFIG_DIR / f"deepspeed_{strategy.split('_')[-1]}.json"
    if not path.exists():
        raise TrainError(f"train.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    auto = {
        ("train_micro_batch_size_per_gpu",): 1,  # one token-budget micro-batch
        ("gradient_accumulation_steps",): cfg.grad_accum,
        ("train_batch_size",): world_size * cfg.grad_accum,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("bf16", "enabled"): cfg.precision == "bf16",
    }

    def fill(d: dict, prefix: tuple) -> None:
        for k, v in list(d.items()):
            key = (*prefix, k)
            if isinstance(v, dict):
                fill(v, key)
            elif v == "auto":
                if key not in auto:
                    raise TrainError(f"{path}: '{'.'.join(key)}' is \"auto\", which rank1 cannot fill")
                d[k] = auto[key]

    fill(ds, ())
    for key, v in auto.items():
        if len(key) == 1:
            ds.setdefault(key[0], v)
    stage = ds.get("zero_optimization", {}).get("stage")
    want = int(strategy[-1])
    if stage != want:
        raise TrainError(f"{path}: zero_optimization.stage is {stage!r} but train strategy is {strategy}")
    ds.setdefault("zero_allow_untested_optimizer", True)  # rank1 passes torch's AdamW
    return ds


class Engine:
    """Model + optimizer + schedule of one worker, for one strategy: the objective of
    `rank1_core.harness` (see there for the protocol).

    `micro_step` runs forward and backward of one micro-batch; `step` applies the optimizer
    after the last micro-batch of an optimizer step. `save`/`load` write and read this
    worker's part of a checkpoint; `export` writes the adapter or model (rank 0 writes).
    `evaluate` measures the held-out loss on the traces given to `use_heldout`.
    """

    sharded_checkpoint = False
    """True when every worker writes a part of a checkpoint (DeepSpeed)."""

    def __init__(self, model, cfg: TrainConfig, st: Settings, total_steps: int, rank: int, world_size: int):
        self.cfg, self.st, self.rank, self.world_size = cfg, st, rank, world_size
        self.lm = model
        self.base = loss_model(model)
        self.total_steps = total_steps
        self._autocast_on = cfg.precision == "bf16_autocast"
        self.heldout: list[Doc] = []
        self.pad_id = 0
        self.tokenizer = None
        """Saved beside an exported full model."""

    @property
    def name(self) -> str:
        return f"train[{self.st.mode}]"

    def use_heldout(self, docs: list[Doc], pad_id: int) -> None:
        self.heldout, self.pad_id = docs, pad_id

    def evaluate(self) -> dict:
        return {"heldout_loss": heldout_loss(self, self.heldout, self.cfg, self.pad_id)}

    def row(self, totals: list[float], count: float) -> dict:
        s, n = totals
        return {"loss": s / max(n, 1.0), "heldout_loss": float("nan")}

    def describe(self, row: dict) -> str:
        return f"{self.name} loss {row['loss']:.4f} {row['tokens_per_s']:.0f} tok/s"

    def micro_step(self, batch: DocBatch, last: bool):
        """Forward and backward of one micro-batch: tensor [loss sum, labelled positions]. The
        loss is scaled by workers / the step's loss tokens, so accumulation and data
        parallelism give the gradient of one big batch."""
        import torch

        dev = self.device()
        s, n = self._micro_step([t.to(dev) for t in batch[:3]], self.world_size / max(batch.step_loss_tokens, 1),
                                last)
        return torch.tensor([s, float(n)], dtype=torch.float64)

    def autocast(self):
        import torch

        if not self._autocast_on:
            return contextlib.nullcontext()
        device = "cuda" if torch.cuda.is_available() and self.cfg.gpus_per_worker else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def device(self):
        return next(self.base.parameters()).device

    @property
    def module(self):
        """The unwrapped model (peft model in lora mode)."""
        return self.lm

    def trainable(self) -> dict:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def eval_batch(self, ids, att, labels) -> tuple[float, int]:
        import torch

        with torch.no_grad(), self.autocast():
            s, n = self.forward(ids, att, labels)
        return float(s), int(n)

    def forward(self, ids, att, labels):
        """(loss sum, labelled positions) through the strategy's wrapper."""
        return self.wrapped(ids, att, labels)


class TorchEngine(TorchOptimizer, Engine):
    """One process, or DDP when a torch.distributed group of more than one rank exists."""

    def __init__(self, model, cfg, st, total_steps, rank, world_size, device="cpu"):
        import torch

        super().__init__(model, cfg, st, total_steps, rank, world_size)
        self.base.to(device)
        self.wrapped = harness.ddp(self.base, world_size, device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=st.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total_steps, cfg.warmup_ratio, cfg.lr_schedule))
        self.params = params
        self.max_grad_norm = cfg.max_grad_norm

    def _micro_step(self, batch, scale: float, last: bool) -> tuple[float, int]:
        ids, att, labels = batch
        with harness.grad_sync(self.wrapped, last):
            with self.autocast():
                s, n = self.wrapped(ids, att, labels)
            (s * scale).backward()
        return float(s.detach()), int(n)

    def save(self, d: Path) -> None:
        import torch

        if self.rank != 0:
            return
        trainable = {n: p.detach().cpu() for n, p in self.trainable().items()}
        with atomic_local_path(d / ENGINE_FILE) as tmp:
            torch.save({"trainable": trainable, "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict()}, tmp)

    def load(self, d: Path) -> None:
        import torch

        f = d / ENGINE_FILE
        if not f.exists():
            raise TrainError(f"checkpoint {d} has no {ENGINE_FILE}")
        blob = torch.load(f, map_location="cpu", weights_only=False)
        want = set(self.trainable())
        have = set(blob["trainable"])
        if want != have:
            raise TrainError(f"checkpoint {d} does not match the model: {len(want ^ have)} parameter names differ "
                             f"(e.g. {sorted(want ^ have)[0]})")
        with torch.no_grad():
            for n, p in self.trainable().items():
                p.copy_(blob["trainable"][n])
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])

    def export(self, out: Path) -> None:
        if self.rank != 0:
            return
        _save_export(self.module, self.st.mode, out, self.tokenizer)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 (CPU or GPU) inside an existing torch.distributed group."""

    sharded_checkpoint = True

    def __init__(self, model, cfg, st, total_steps, rank, world_size, device="cpu"):
        import torch

        super().__init__(model, cfg, st, total_steps, rank, world_size)
        from rank1_core.device import set_torch_extensions_dir

        set_torch_extensions_dir()  # per CPU kind: DeepSpeed builds its ops -march=native
        import deepspeed

        self.ds_config = deepspeed_config(cfg, st.strategy, world_size)
        self.zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=st.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        fn = lr_lambda(total_steps, cfg.warmup_ratio, cfg.lr_schedule)
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=self.base, optimizer=opt, config=self.ds_config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, fn),
        )
        self._deepspeed = deepspeed
        self.wrapped = self.engine

    def _micro_step(self, batch, scale: float, last: bool) -> tuple[float, int]:
        ids, att, labels = batch
        with self.autocast():
            s, n = self.engine(ids, att, labels)
        self.engine.backward(s * scale, scale_wrt_gas=False)
        self.engine.step()  # applies the optimizer at the accumulation boundary only
        return float(s.detach()), int(n)

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, d: Path) -> None:
        self.engine.save_checkpoint(str(d), tag=DS_TAG, exclude_frozen_parameters=self.st.mode == "lora")

    def load(self, d: Path) -> None:
        if not (d / DS_TAG).exists():
            raise TrainError(f"checkpoint {d} has no DeepSpeed state ({DS_TAG}/)")
        path, _ = self.engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=self.st.mode != "lora")
        if path is None:
            raise TrainError(f"DeepSpeed could not load the checkpoint in {d}")

    def export(self, out: Path) -> None:
        params = [p for n, p in self.module.named_parameters() if self.st.mode == "full" or "lora_" in n]
        gather = (self._deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.zero3 else contextlib.nullcontext())
        with gather:  # every rank takes part; rank 0 writes the full (not partitioned) weights
            if self.rank == 0:
                _save_export(self.module, self.st.mode, out, self.tokenizer)


def _save_export(module, mode: str, out: Path, tokenizer) -> None:
    """The adapter (peft) or the full model (+ tokenizer) as a folder, in place whole or not at all."""
    with atomic_dir(out) as tmp:
        if mode != "lora":
            module.config.use_cache = True
        module.save_pretrained(str(tmp), safe_serialization=True)
        if mode != "lora" and tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def make_engine(model, cfg: TrainConfig, st: Settings, total_steps: int, rank: int = 0, world_size: int = 1,
                device: str = "cpu") -> Engine:
    cls = TorchEngine if st.strategy == "ddp" else DeepSpeedEngine
    return cls(model, cfg, st, total_steps, rank, world_size, device=device)


# --------------------------------------------------------------------------- loop


def heldout_loss(engine: Engine, docs: list[Doc], cfg: TrainConfig, pad_id: int) -> float:
    """Mean cross-entropy over the loss tokens of the held-out traces (all workers share it)."""
    if not docs:
        return float("nan")
    mbs = plan_microbatches([d.n for d in docs], cfg.batch_tokens, 0, 0, shuffle=False)
    w = engine.world_size
    padded = mbs + [None] * (-len(mbs) % w)  # equal forward passes per worker (ZeRO-3 needs it)
    s = n = 0.0
    engine.module.eval()
    try:
        for mb in padded[engine.rank::w]:
            real = mb is not None
            batch = collate([docs[i] for i in (mb if real else mbs[0])], pad_id)
            ls, ln = engine.eval_batch(*[t.to(engine.device()) for t in batch])
            if real:
                s, n = s + ls, n + ln
    finally:
        engine.module.train()
    s, n = harness.all_reduce([s, n])
    return s / max(n, 1.0)


def total_steps(docs: list[Doc], cfg: TrainConfig, st: Settings, seed: int, world_size: int) -> int:
    return DocSteps(docs, cfg.batch_tokens, cfg.grad_accum, seed, 0, 0, world_size).total(st.epochs, cfg.max_steps)


def train_loop(engine: Engine, train_docs: list[Doc], heldout_docs: list[Doc], cfg: TrainConfig, st: Settings,
               seed: int, pad_id: int, state: Optional[TrainState] = None, *,
               report: Callable[[dict, TrainState, bool], None] = lambda m, s, c: None,
               on_step_end: Callable[[TrainState], None] = lambda s: None,
               progress: Optional[Callable[..., object]] = None) -> TrainState:
    """`rank1_core.harness.train` over `engine`: train until the last epoch (or
    train.max_steps), measuring the held-out loss at the start, at the end of every epoch
    (or every train.eval_every steps) and at the end; return the final state."""
    engine.use_heldout(heldout_docs, pad_id)
    source = DocSteps(train_docs, cfg.batch_tokens, cfg.grad_accum, seed, pad_id, engine.rank, engine.world_size)
    return harness.train(engine, source, plan(cfg, st, source), state, report=report, on_step_end=on_step_end,
                         progress=progress, name=engine.name)


def plan(cfg: TrainConfig, st: Settings, source: DocSteps) -> Plan:
    return Plan(st.epochs, source.total(st.epochs, cfg.max_steps), cfg.checkpoint_every, cfg.eval_every)


def metrics_table(history: list[dict]):
    """Per-step metrics as an Arrow table (NaN held-out losses become nulls)."""
    return harness.metrics_table(history, METRIC_COLUMNS)


def job(args: dict, rank: int, world: int, device) -> harness.Job:
    """The training of the `train` (mode lora) / `train_full` (mode full) stage in one worker,
    for `ray_jobs/harness.py`. `args`: config (a dict), mode, model_dir, num_layers, tokens
    (prepare's tokens URI). Its finish exports the adapter (`adapter/`) or the model with its
    tokenizer (`model/`) into the stage folder."""
    from rank1_core.config import config_from_dict
    from rank1_core.models import load_tokenizer
    from rank1_core.rundir import resolve_filesystem

    cfg = config_from_dict(args["config"])
    mode = args["mode"]
    tc = for_mode(cfg.train, mode)
    fs, path = resolve_filesystem(args["tokens"])
    train_docs, held = load_docs(fs, path, "train"), load_docs(fs, path, "heldout")
    tok = load_tokenizer(args["model_dir"])
    st = settings(tc, mode)
    zero3 = deepspeed_config(tc, st.strategy, world) if st.strategy == "deepspeed_zero3" else None
    model = build_model(args["model_dir"], tc, mode, args["num_layers"], cfg.run.seed, zero3)
    source = DocSteps(train_docs, tc.batch_tokens, tc.grad_accum, cfg.run.seed, tok.pad_token_id, rank, world)
    p = plan(tc, st, source)
    engine = make_engine(model, tc, st, p.limit, rank, world, device)
    engine.use_heldout(held, tok.pad_token_id)
    engine.tokenizer = tok
    out = "adapter" if mode == "lora" else "model"
    return harness.Job(engine, source, p, METRIC_COLUMNS, finish=lambda stage, state: harness.export(engine, stage, out))
