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
  DeepSpeed ZeRO-2/3. It does forward/backward, the optimizer step, checkpoints and the
  final export (peft adapter or Hugging Face model directory).
- `train_loop`: epochs, steps, held-out loss, metrics; resumable from a `TrainState`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from rank1_core.config import TrainConfig

MODES = ("lora", "full")
STATE_FILE = "train_state.json"
ENGINE_FILE = "engine.pt"
DS_TAG = "ds"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class TrainError(RuntimeError):
    """Training cannot proceed (too little data for the layout, a broken checkpoint, ...)."""


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


def epoch_steps(docs: list[Doc], cfg: TrainConfig, seed: int, epoch: int, world_size: int) -> list[list[list[int]]]:
    mbs = plan_microbatches([d.n for d in docs], cfg.batch_tokens, seed, epoch)
    return plan_steps(mbs, world_size, cfg.grad_accum)


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

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    hf_ds = None
    if zero3_config is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rank1" / "torch_extensions"))
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


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Engine:
    """Model + optimizer + schedule of one worker, for one strategy.

    `micro_step` runs forward and backward of one micro-batch; `step` applies the optimizer
    after the last micro-batch of an optimizer step. `save`/`load` write and read this
    worker's part of a checkpoint; `export` writes the adapter or model (rank 0 writes).
    """

    sharded_checkpoint = False
    """True when every worker writes a part of a checkpoint (DeepSpeed)."""

    def __init__(self, model, cfg: TrainConfig, st: Settings, total_steps: int, rank: int, world_size: int):
        self.cfg, self.st, self.rank, self.world_size = cfg, st, rank, world_size
        self.lm = model
        self.base = loss_model(model)
        self.total_steps = total_steps
        self._autocast_on = cfg.precision == "bf16_autocast"

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


class TorchEngine(Engine):
    """One process, or DDP when a torch.distributed group of more than one rank exists."""

    def __init__(self, model, cfg, st, total_steps, rank, world_size, device="cpu"):
        import torch

        super().__init__(model, cfg, st, total_steps, rank, world_size)
        self.base.to(device)
        self.wrapped = self.base
        if _dist() is not None and world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            kw = {"device_ids": [torch.device(device).index or 0]} if str(device).startswith("cuda") else {}
            self.wrapped = DistributedDataParallel(self.base, **kw)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=st.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total_steps, cfg.warmup_ratio, cfg.lr_schedule))
        self.params = params

    def micro_step(self, batch, scale: float, last: bool) -> tuple[float, int]:
        ids, att, labels = batch
        sync = contextlib.nullcontext()
        if not last and hasattr(self.wrapped, "no_sync"):
            sync = self.wrapped.no_sync()
        with sync:
            with self.autocast():
                s, n = self.wrapped(ids, att, labels)
            (s * scale).backward()
        return float(s.detach()), int(n)

    def step(self) -> float:
        import torch

        if self.cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None])))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def save(self, d: Path) -> None:
        import torch

        if self.rank != 0:
            return
        trainable = {n: p.detach().cpu() for n, p in self.trainable().items()}
        torch.save({"trainable": trainable, "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict()}, d / ENGINE_FILE)

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

    def export(self, out: Path, tokenizer=None) -> None:
        if self.rank != 0:
            return
        _save_export(self.module, self.st.mode, out, tokenizer)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 (CPU or GPU) inside an existing torch.distributed group."""

    sharded_checkpoint = True

    def __init__(self, model, cfg, st, total_steps, rank, world_size, device="cpu"):
        import torch

        super().__init__(model, cfg, st, total_steps, rank, world_size)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rank1" / "torch_extensions"))
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

    def micro_step(self, batch, scale: float, last: bool) -> tuple[float, int]:
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

    def export(self, out: Path, tokenizer=None) -> None:
        params = [p for n, p in self.module.named_parameters() if self.st.mode == "full" or "lora_" in n]
        gather = (self._deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.zero3 else contextlib.nullcontext())
        with gather:  # every rank takes part; rank 0 writes the full (not partitioned) weights
            if self.rank == 0:
                _save_export(self.module, self.st.mode, out, tokenizer)


def _save_export(module, mode: str, out: Path, tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if mode == "lora":
        module.save_pretrained(str(out), safe_serialization=True)
    else:
        module.config.use_cache = True
        module.save_pretrained(str(out), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))


def make_engine(model, cfg: TrainConfig, st: Settings, total_steps: int, rank: int = 0, world_size: int = 1,
                device: str = "cpu") -> Engine:
    cls = TorchEngine if st.strategy == "ddp" else DeepSpeedEngine
    return cls(model, cfg, st, total_steps, rank, world_size, device=device)


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Where a run is; saved as JSON in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Steps of the current epoch done."""
    tokens: int = 0
    """Tokens (without padding) trained on so far, all workers."""
    finished: bool = False
    history: list[dict] = field(default_factory=list)
    """One metrics row per step (and step 0 with the initial held-out loss)."""
    resumed_from: list[int] = field(default_factory=list)
    """Step of each checkpoint this run was resumed from."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def save_checkpoint(engine: Engine, state: TrainState, d: Path) -> None:
    """This worker's part of a checkpoint (rank 0 also writes the state)."""
    d.mkdir(parents=True, exist_ok=True)
    engine.save(d)
    if engine.rank == 0:
        (d / STATE_FILE).write_text(state.to_json())


def load_checkpoint(engine: Engine, d: Path) -> TrainState:
    f = d / STATE_FILE
    if not f.exists():
        raise TrainError(f"checkpoint {d} has no {STATE_FILE}")
    state = TrainState.from_json(f.read_text())
    if not state.finished:
        engine.load(d)
    return state


# --------------------------------------------------------------------------- loop


def _allreduce(values: list[float]) -> list[float]:
    dist = _dist()
    if dist is None:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


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
    s, n = _allreduce([s, n])
    return s / max(n, 1.0)


def total_steps(docs: list[Doc], cfg: TrainConfig, st: Settings, seed: int, world_size: int) -> int:
    n = sum(len(epoch_steps(docs, cfg, seed, e, world_size)) for e in range(st.epochs))
    return min(n, cfg.max_steps) if cfg.max_steps else n


def train_loop(engine: Engine, train_docs: list[Doc], heldout_docs: list[Doc], cfg: TrainConfig, st: Settings,
               seed: int, pad_id: int, state: Optional[TrainState] = None, *,
               report: Callable[[dict, TrainState, bool], None] = lambda m, s, c: None,
               on_step_end: Callable[[TrainState], None] = lambda s: None,
               progress: Optional[Callable[..., object]] = None) -> TrainState:
    """Train until the last epoch (or train.max_steps); return the final state.

    `report(metrics, state, checkpoint)` is called once per step on every worker (and once
    for the initial held-out loss); when `checkpoint` is true the caller saves a checkpoint
    (`save_checkpoint`) of `state`. A run given the `state` of a checkpoint continues after
    its last step with the same data order, so it ends with the same weights.
    """
    state = state or TrainState()
    rank, w = engine.rank, engine.world_size
    limit = total_steps(train_docs, cfg, st, seed, w)
    dev = engine.device()
    bar = None
    if progress is not None and rank == 0:
        bar = progress(total=limit, desc=f"train[{st.mode}]", unit="step")  # tqdm or Ray's tqdm_ray
        if state.step:
            bar.update(state.step)

    def evaluate() -> float:
        return heldout_loss(engine, heldout_docs, cfg, pad_id)

    if state.step == 0 and not state.history:
        h = evaluate()
        row = {"step": 0, "epoch": 0.0, "loss": float("nan"), "lr": 0.0, "tokens": 0, "tokens_per_s": float("nan"),
               "grad_norm": float("nan"), "heldout_loss": h, "wall": time.time()}
        state.history.append(row)
        report(row, state, False)

    while state.epoch < st.epochs and state.step < limit:
        steps = epoch_steps(train_docs, cfg, seed, state.epoch, w)
        while state.step_in_epoch < len(steps) and state.step < limit:
            mbs = steps[state.step_in_epoch]
            mine = mbs[rank::w]
            global_loss_tokens = sum(train_docs[i].loss_tokens for mb in mbs for i in mb)
            scale = w / max(global_loss_tokens, 1)
            t0 = time.perf_counter()
            s = n = real = 0.0
            for k, mb in enumerate(mine):
                batch = [t.to(dev) for t in collate([train_docs[i] for i in mb], pad_id)]
                ls, ln = engine.micro_step(batch, scale, last=k == len(mine) - 1)
                s, n, real = s + ls, n + ln, real + int(batch[1].sum())
            lr = engine.lr
            norm = engine.step()
            s, n, real = _allreduce([s, n, real])
            dt = time.perf_counter() - t0
            state.step += 1
            state.step_in_epoch += 1
            state.tokens += int(real)
            epoch_done = state.step_in_epoch == len(steps)
            last = state.step >= limit
            row = {"step": state.step, "epoch": state.epoch + state.step_in_epoch / len(steps),
                   "loss": s / max(n, 1.0), "lr": lr, "tokens": int(real), "tokens_per_s": real / dt,
                   "grad_norm": norm, "heldout_loss": float("nan"), "wall": time.time()}
            if epoch_done or last or (cfg.eval_every and state.step % cfg.eval_every == 0):
                row["heldout_loss"] = evaluate()
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.history.append(row)
            ckpt = (epoch_done or last) if not cfg.checkpoint_every else (state.step % cfg.checkpoint_every == 0 or last)
            report(row, state, ckpt)
            if bar is not None:
                bar.set_description(f"train[{st.mode}] loss {row['loss']:.4f} {row['tokens_per_s']:.0f} tok/s")
                bar.update(1)
            on_step_end(state)
    if bar is not None:
        bar.close()
    state.finished = True
    return state


def metrics_table(history: list[dict]):
    """Per-step metrics as an Arrow table (NaN held-out losses become nulls)."""
    import pyarrow as pa

    cols = ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "heldout_loss", "wall"]
    data = {c: [r.get(c) for r in history] for c in cols}
    for c in ("loss", "tokens_per_s", "grad_norm", "heldout_loss"):
        data[c] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in data[c]]
    schema = pa.schema([("step", pa.int64()), ("epoch", pa.float64()), ("loss", pa.float64()), ("lr", pa.float64()),
                        ("tokens", pa.int64()), ("tokens_per_s", pa.float64()), ("grad_norm", pa.float64()),
                        ("heldout_loss", pa.float64()), ("wall", pa.float64())])
    return pa.Table.from_pydict(data, schema=schema)
