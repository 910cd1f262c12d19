"""The one training harness of every trained stage (train, train_full, sae, transcoder). No Ray.

`ray_jobs/harness.py` runs it inside Ray Train workers; tests and benchmarks call it directly.
What is trained is an *objective*, a small protocol each trainer implements
(`rank1_core.train.Engine` for the rank-1 LoRA and the full fine-tune,
`rank1_core.sae.SAETrainer`, `rank1_core.transcoder.TranscoderTrainer`):

    name                      for messages and the bar ("train[lora]", "sae", "transcoder")
    rank, world_size          this worker and the number of workers
    sharded_checkpoint        True when every worker writes a part of a checkpoint (DeepSpeed)
    micro_step(data, last)    forward and backward of one micro-batch; returns a tensor of its
                              statistics (the harness sums them over micro-batches and workers)
    lr                        learning rate of the coming optimizer step
    step()                    the optimizer step after the step's last micro-batch; returns
                              the gradient norm (nan where not measured)
    row(totals, count)        the objective's metrics of a step from its statistics summed over
                              `count` micro-batches of all workers
    evaluate()                held-out metrics (a dict), or None when the objective has none
    describe(row)             the progress bar's text
    save(d) / load(d)         this worker's part of a checkpoint folder
    export(d)                 the trained artefact (rank 0 writes)

Data comes from a *step source*: `epoch(e, start)` returns the number of optimizer steps of
epoch e and an iterator over its steps from step `start` on, each the list of this worker's
`Micro` batches. `train` runs epochs and steps, all-reduces the statistics, keeps the
`TrainState` (resumable: a run given a checkpoint's state continues after its last step with
the same data order, so it ends with the same weights), and calls `report(row, state,
checkpoint)` once per step (and once for the initial held-out metrics); when `checkpoint` is
true the caller saves one with `save_checkpoint`. The last step's checkpoint is marked
finished. `metrics_table` turns the history into the stage's `metrics.parquet`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

from rank1_core.rundir import write_bytes_atomic, write_parquet_atomic, write_text_atomic

STATE_FILE = "train_state.json"


class TrainError(RuntimeError):
    """Training cannot proceed (too little data for the layout, a broken checkpoint, ...)."""


class Micro(NamedTuple):
    """One micro-batch of one worker."""

    data: Any
    """What the objective's `micro_step` takes (tensors of a token batch, activations, ...)."""
    tokens: int
    """Tokens in it (padding excluded): the metrics' token counts."""


class StepSource(Protocol):
    def epoch(self, epoch: int, start: int) -> tuple[int, Iterator[list[Micro]]]:
        """(steps in `epoch`, this worker's micro-batches of each step from step `start` on)."""


@dataclass
class Plan:
    """How long a run trains and when it checkpoints and evaluates."""

    epochs: int
    limit: int
    """Optimizer steps in all (the epochs' steps, or fewer with a max_steps)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: at the end of every epoch); the last step always has one."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: at the start and the end of every epoch)."""


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
    """One metrics row per step (and step 0 with the initial held-out metrics, if any)."""
    resumed_from: list[int] = field(default_factory=list)
    """Step of each checkpoint this run was resumed from."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(objective, state: TrainState, d: Path) -> None:
    """This worker's part of a checkpoint (rank 0 also writes the state)."""
    d.mkdir(parents=True, exist_ok=True)
    objective.save(d)
    if objective.rank == 0:
        write_text_atomic(d / STATE_FILE, state.to_json())


def load_checkpoint(objective, d: Path) -> TrainState:
    """The state of a checkpoint folder, with the objective restored from it."""
    f = d / STATE_FILE
    if not f.exists():
        raise TrainError(f"checkpoint {d} has no {STATE_FILE}")
    state = TrainState.from_json(f.read_text())
    objective.load(d)
    return state


# --------------------------------------------------------------------------- all-reduce


def dist_group():
    """torch.distributed when a process group is up (Ray Train workers), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def comm_device():
    """Where collective tensors must live: the GPU for nccl, else the CPU."""
    import torch

    dist = dist_group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float]) -> list[float]:
    """Sums of `values` over all workers (float64); the values themselves without a group."""
    dist = dist_group()
    if dist is None:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


# --------------------------------------------------------------------------- the loop


def _checkpoint_due(plan: Plan, step: int, epoch_done: bool, last: bool) -> bool:
    if not plan.checkpoint_every:
        return epoch_done or last
    return step % plan.checkpoint_every == 0 or last


def train(objective, source: StepSource, plan: Plan, state: Optional[TrainState] = None, *,
          report: Callable[[dict, TrainState, bool], None] = lambda m, s, c: None,
          on_step_end: Callable[[TrainState], None] = lambda s: None,
          progress: Optional[Callable[..., Any]] = None, name: str = "train") -> TrainState:
    """Train until the last epoch (or `plan.limit` steps); return the final state.

    Rows hold step, epoch (fractional), lr, grad_norm, tokens (this step's, all workers),
    tokens_per_s, wall, the objective's `row` and, where evaluated, its `evaluate`.
    `progress` is a tqdm-like factory for rank 0's bar (tqdm, or Ray's tqdm_ray)."""
    state = state or TrainState()
    rank = objective.rank
    bar = None
    if progress is not None and rank == 0:
        bar = progress(total=plan.limit, desc=name, unit="step")
        if state.step:
            bar.update(state.step)

    if state.step == 0 and not state.history:
        held = objective.evaluate()
        if held is not None:
            row = {"step": 0, "epoch": 0.0, "lr": 0.0, "tokens": 0, "tokens_per_s": float("nan"),
                   "grad_norm": float("nan"), "wall": time.time(), **held}
            state.history.append(row)
            report(row, state, False)

    while state.epoch < plan.epochs and state.step < plan.limit:
        n_steps, steps = source.epoch(state.epoch, state.step_in_epoch)
        for micros in steps:
            if state.step >= plan.limit:
                break
            t0 = time.perf_counter()
            acc, real = None, 0
            for k, mb in enumerate(micros):
                stats = objective.micro_step(mb.data, last=k == len(micros) - 1)
                acc = stats if acc is None else acc + stats
                real += mb.tokens
            lr = objective.lr
            norm = objective.step()
            *totals, count, real = all_reduce([*acc.tolist(), float(len(micros)), float(real)])
            dt = time.perf_counter() - t0
            state.step += 1
            state.step_in_epoch += 1
            state.tokens += int(real)
            epoch_done = state.step_in_epoch == n_steps
            last = state.step >= plan.limit
            row = {"step": state.step, "epoch": state.epoch + state.step_in_epoch / n_steps, "lr": lr,
                   "grad_norm": norm, "tokens": int(real), "tokens_per_s": real / dt, "wall": time.time(),
                   **objective.row(totals, count)}
            if epoch_done or last or (plan.eval_every and state.step % plan.eval_every == 0):
                row.update(objective.evaluate() or {})
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.history.append(row)
            state.finished = last
            report(row, state, _checkpoint_due(plan, state.step, epoch_done, last))
            if bar is not None:
                bar.set_description(objective.describe(row))
                bar.update(1)
            on_step_end(state)
            if epoch_done:
                break  # the next epoch has its own order
        else:
            if state.step < plan.limit:
                raise TrainError(f"[{name}] epoch {state.epoch} ended after {state.step_in_epoch} of its "
                                 f"{n_steps} steps")
    if bar is not None:
        bar.close()
    state.finished = True
    return state


# --------------------------------------------------------------------------- a stage's training


@dataclass
class Job:
    """A trained stage as one worker runs it (`ray_jobs/harness.py`): what to train, on what,
    for how long, and what to do around it."""

    objective: Any
    source: StepSource
    plan: Plan
    metric_columns: Sequence[str]
    """Columns of the stage's metrics.parquet (from the state's history rows)."""
    start: Callable[[], None] = lambda: None
    """Before the first step of a fresh run (not on a resumed one)."""
    finish: Callable[[Any, TrainState], None] = lambda stage, state: None
    """After the last step, on every worker: write the stage's outputs into `stage` (a
    `rank1_core.rundir.StageDir`). Runs again when a finished run is resumed."""
    bar: bool = True
    """A terminal progress bar on rank 0."""


def export(objective, stage, rel: str) -> None:
    """`objective.export` (every worker takes part) into the stage folder's `rel`, replacing it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rank1-export-") as tmp:
        objective.export(Path(tmp) / rel)
        if objective.rank == 0:
            if stage.exists(rel):
                stage.fs.delete_dir(stage.path(rel))
            stage.upload_dir(Path(tmp) / rel, rel)


def write_state(fs, path: str, state: TrainState, columns: Sequence[str]) -> None:
    """A stage's `metrics.parquet` (`columns` of the history) and `train_state.json` (where its
    training ended) in the folder `path` of the pyarrow filesystem `fs`."""
    write_parquet_atomic(fs, f"{path}/metrics.parquet", metrics_table(state.history, columns))
    write_bytes_atomic(fs, f"{path}/{STATE_FILE}", state.to_json().encode())


# --------------------------------------------------------------------------- metrics


def metrics_table(history: Sequence[dict], columns: Sequence[str], ints: Iterable[str] = ("step", "tokens")):
    """Per-step metrics as an Arrow table of `columns` (int64 for `ints`, float64 otherwise);
    a value a row lacks, or a NaN (not measured), is null."""
    import pyarrow as pa

    ints = set(ints)

    def value(v, c):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return int(v) if c in ints else float(v)

    schema = pa.schema([(c, pa.int64() if c in ints else pa.float64()) for c in columns])
    return pa.Table.from_pydict({c: [value(r.get(c), c) for r in history] for c in columns}, schema=schema)


# --------------------------------------------------------------------------- torch objectives


def ddp(module, world_size: int, device):
    """`module` wrapped in DistributedDataParallel when a group of more than one worker is up."""
    if dist_group() is None or world_size <= 1:
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    kw = {"device_ids": [device.index or 0]} if device.type == "cuda" else {}
    return DistributedDataParallel(module, **kw)


def grad_sync(wrapped, last: bool):
    """DDP's gradient all-reduce only in the step's last micro-batch (`no_sync` before it)."""
    import contextlib

    if not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


class TorchOptimizer:
    """The optimizer step of an objective with a torch optimizer `opt`, a scheduler `sched`,
    its trainable `params` and `max_grad_norm` (0: no clipping)."""

    params: list
    opt: Any
    sched: Any
    max_grad_norm: float

    def step(self) -> float:
        import torch

        if self.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None])))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])
