"""Cross-layer BatchTopK sparse autoencoder over the whole per-token adapter state.

The input of one token is the vector of every adapter component's scalar (layers x 7
columns, in the component catalogue's order). The SAE (Bussmann et al. 2024, "BatchTopK
sparse autoencoders"; Gao et al. 2024 for AuxK and the tied initialisation):

    x_n   = (x - shift) / scale                       # input normalisation fitted on the data
    pre   = relu((x_n - b_dec) @ W_enc + b_enc)       # pre-encoder bias b_dec
    z     = BatchTopK(pre, k)  (training)             # the k x batch largest values of the batch
          | pre * (pre > threshold)  (inference)      # batch-independent
    x_hat = (z @ W_dec + b_dec) * scale + shift       # W_dec rows have unit norm

Training minimises the mean squared error in normalised space plus `aux_coef` times AuxK:
the residual `x_n - x_hat_n` (detached) reconstructed by the `aux_k` largest activations of
the latents that have not fired for `dead_tokens` training tokens, as a normalised MSE.
After every step the decoder rows are renormalised; before it, the gradient component
parallel to each row is removed. The inference threshold is a running average (rate
`threshold_ema`) of the smallest activation BatchTopK kept in each batch.

Pieces (no ray here; `ray_jobs/sae.py` wires them into Ray Data and Ray Train):

- input contract: `read_catalogue`, `activation_files`, `check_activation_files`,
  `fit_normalization`, `ColumnCollate`, `iter_activation_batches` (pyarrow streaming with
  a shuffle buffer; the Ray path streams with Ray Data instead and uses the same collate);
- model: `BatchTopKSAE` (`encode`, `decode`, `forward`, `train_forward`, `save`, `load`);
- training: `SAETrainer` (the objective `rank1_core.harness` trains: one optimizer step per
  batch, checkpointable), `BatchSteps` (batches as the harness's steps), `run_training`, `job`
  (the stage's training in one Ray Train worker);
- encoding: `encode_batches` (every token, sparse rows of live latents, `EncodeStats`),
  `write_outputs`; `train_local` runs the whole stage without Ray.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from rank1_core import harness
from rank1_core.config import SAEConfig
from rank1_core.rundir import atomic_local_path, write_bytes_atomic, write_parquet_atomic

FORMAT_VERSION = 1
ID_COLUMNS = ("doc_id", "pos", "token_id")
FEATURE_SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()),
                            ("feature", pa.int32()), ("value", pa.float32())])
METRIC_COLUMNS = ("step", "tokens", "loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction",
                  "lr", "threshold")
"""Columns of metrics.parquet (tokens: trained on so far)."""


class SAEInputError(ValueError):
    """The activation data does not match what the SAE expects. The message names the file,
    row or column."""


def feature_name(idx: int) -> str:
    return f"F{idx:05d}"


# --------------------------------------------------------------------------- input contract


def _fs(fs: Optional[pafs.FileSystem]) -> pafs.FileSystem:
    return fs if fs is not None else pafs.LocalFileSystem()


def read_catalogue(fs: Optional[pafs.FileSystem], path: str) -> pa.Table:
    """The extract stage's `components.parquet`, sorted by component_id."""
    fs = _fs(fs)
    try:
        with fs.open_input_file(path) as f:
            tab = pq.read_table(f)
    except FileNotFoundError:
        raise SAEInputError(f"component catalogue {path} does not exist") from None
    need = {"component_id", "column", "layer", "module", "kind"}
    missing = sorted(need - set(tab.column_names))
    if missing:
        raise SAEInputError(f"component catalogue {path} lacks columns {missing}")
    tab = tab.sort_by("component_id")
    cols = tab.column("column").to_pylist()
    if len(set(cols)) != len(cols):
        dup = sorted({c for c in cols if cols.count(c) > 1})
        raise SAEInputError(f"component catalogue {path} repeats columns {dup}")
    if not cols:
        raise SAEInputError(f"component catalogue {path} is empty")
    return tab


def activation_files(fs: Optional[pafs.FileSystem], directory: str) -> list[str]:
    """Sorted Parquet files of an activation directory."""
    fs = _fs(fs)
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not i.base_name.startswith((".", "_")))  # no temporary or hidden files
    if not files:
        raise SAEInputError(f"no activation Parquet files in {directory}")
    return files


def check_activation_files(fs: Optional[pafs.FileSystem], files: list[str], columns: list[str]) -> list[int]:
    """Check every file's schema against the catalogue columns; return each file's row count.

    Each file needs doc_id, pos and every catalogue column as a float; a float column the
    catalogue does not name is an error too (the SAE width would silently disagree)."""
    fs = _fs(fs)
    rows = []
    want = set(columns)
    for path in files:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            rows.append(pf.metadata.num_rows)
        names = set(schema.names)
        for c in ("doc_id", "pos"):
            if c not in names:
                raise SAEInputError(f"{path}: missing id column {c!r}")
        missing = [c for c in columns if c not in names]
        if missing:
            raise SAEInputError(
                f"{path}: missing {len(missing)} component column(s) of the catalogue, e.g. {missing[:5]} "
                f"(table width {len(names & want)} of {len(columns)})"
            )
        extra = [n for n in schema.names if n not in want and n not in ID_COLUMNS
                 and pa.types.is_floating(schema.field(n).type)]
        if extra:
            raise SAEInputError(
                f"{path}: {len(extra)} float column(s) not in the component catalogue, e.g. {extra[:5]} "
                f"(the SAE input is the catalogue's {len(columns)} columns)"
            )
        for c in columns:
            if not pa.types.is_floating(schema.field(c).type):
                raise SAEInputError(f"{path}: column {c!r} has type {schema.field(c).type}, expected a float")
    return rows


class ColumnCollate:
    """Ray Data / pyarrow batch (dict of column arrays) -> {"x": float32 tensor [B, d] in
    catalogue order, "doc_id": int64 array, "pos": int32 array}; rejects non-finite values
    naming the token and column."""

    def __init__(self, columns: list[str], where: str = "activations"):
        self.columns = list(columns)
        self.where = where

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise SAEInputError(f"{self.where}: batch lacks component columns {missing[:5]}")
        x = np.empty((len(batch["doc_id"]), len(self.columns)), dtype=np.float32)
        for j, c in enumerate(self.columns):
            x[:, j] = batch[c]
        doc_id = np.asarray(batch["doc_id"], dtype=np.int64)
        pos = np.asarray(batch["pos"], dtype=np.int32)
        bad = ~np.isfinite(x)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise SAEInputError(
                f"{self.where}: non-finite value {x[i, j]} in column {self.columns[j]!r} at doc_id "
                f"{doc_id[i]} pos {pos[i]} ({int(bad.sum())} such values in this batch)"
            )
        return {"x": torch.from_numpy(x), "doc_id": doc_id, "pos": pos}


class _Buffer:
    """Rows waiting to be batched; with `shuffle` batches are drawn at random from at least
    `capacity` buffered rows (a local shuffle buffer), else first in, first out."""

    def __init__(self, shuffle: bool, capacity: int, rng: np.random.Generator):
        self.shuffle, self.capacity, self.rng = shuffle, capacity, rng
        self.arrays: Optional[dict[str, np.ndarray]] = None
        self.n = 0

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        m = len(chunk["doc_id"])
        if self.arrays is None:
            self.arrays = {k: np.empty((self.capacity + m,) + v.shape[1:], v.dtype) for k, v in chunk.items()}
        size = len(self.arrays["doc_id"])
        if self.n + m > size:
            new = max(size * 2, self.n + m)
            for k, v in self.arrays.items():
                grown = np.empty((new,) + v.shape[1:], v.dtype)
                grown[: self.n] = v[: self.n]
                self.arrays[k] = grown
        for k, v in chunk.items():
            self.arrays[k][self.n: self.n + m] = v
        self.n += m

    def take(self, b: int) -> dict[str, np.ndarray]:
        assert self.arrays is not None and b <= self.n
        a, n = self.arrays, self.n
        if not self.shuffle:
            out = {k: v[:b].copy() for k, v in a.items()}
            for v in a.values():
                v[: n - b] = v[b:n]
        else:
            idx = self.rng.choice(n, size=b, replace=False)
            out = {k: v[idx] for k, v in a.items()}
            holes = idx[idx < n - b]
            fillers = np.setdiff1d(np.arange(n - b, n), idx, assume_unique=True)
            for v in a.values():
                v[holes] = v[fillers]
        self.n -= b
        return out


def iter_activation_batches(fs: Optional[pafs.FileSystem], files: list[str], columns: list[str],
                            batch_size: int, *, shuffle_buffer: int = 0, seed: int | tuple = 0,
                            drop_last: bool = False, read_rows: int = 16_384,
                            max_rows: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Stream activation Parquet as collated batches without loading it whole.

    Files are read in order, `read_rows` rows at a time; with `shuffle_buffer` > 0 each batch
    is drawn at random (numpy generator seeded with `seed`, an int or a tuple such as
    (run seed, epoch, rank)) from a buffer of at least that
    many rows. Non-finite values raise `SAEInputError` naming the file, token and column."""
    fs = _fs(fs)
    rng = np.random.default_rng(seed)
    buf = _Buffer(shuffle_buffer > 0, max(shuffle_buffer, batch_size), rng)
    need = max(shuffle_buffer, batch_size)
    read = 0
    for path in files:
        collate = ColumnCollate(columns, where=path)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=read_rows, columns=["doc_id", "pos", *columns]):
                if max_rows is not None and read + rb.num_rows > max_rows:
                    rb = rb.slice(0, max_rows - read)
                read += rb.num_rows
                col = collate({n: rb.column(n).to_numpy(zero_copy_only=False) for n in rb.schema.names})
                buf.add({"x": col["x"].numpy(), "doc_id": col["doc_id"], "pos": col["pos"]})
                while buf.n >= need:
                    yield _as_batch(buf.take(batch_size))
                if max_rows is not None and read >= max_rows:
                    break
        if max_rows is not None and read >= max_rows:
            break
    while buf.n >= batch_size:
        yield _as_batch(buf.take(batch_size))
    if buf.n and not drop_last:
        yield _as_batch(buf.take(buf.n))


def _as_batch(a: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"x": torch.from_numpy(a["x"]), "doc_id": a["doc_id"], "pos": a["pos"]}


@dataclass
class Normalization:
    """Affine input normalisation x_n = (x - shift) / scale, fitted on the data."""

    mode: str
    shift: np.ndarray
    scale: np.ndarray
    mean_n: np.ndarray
    """Mean of the normalised sample (initial b_dec)."""
    tokens: int

    def to_dict(self) -> dict:
        return {"mode": self.mode, "shift": self.shift.tolist(), "scale": self.scale.tolist(),
                "mean_n": self.mean_n.tolist(), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(d["mode"], np.asarray(d["shift"], np.float64), np.asarray(d["scale"], np.float64),
                   np.asarray(d["mean_n"], np.float64), int(d["tokens"]))


def fit_normalization(batches: Iterable[dict[str, Any]], mode: str, d: int) -> Normalization:
    """Column mode: per-column mean and std (a constant column keeps scale 1). Scalar mode:
    no shift, one scale with E||x/scale||^2 = d. None: identity."""
    n = 0
    s1 = np.zeros(d, np.float64)
    s2 = np.zeros(d, np.float64)
    for b in batches:
        x = b["x"].numpy().astype(np.float64)
        n += len(x)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    if n == 0:
        raise SAEInputError("no tokens to fit the input normalisation on")
    mean = s1 / n
    if mode == "column":
        var = np.maximum(s2 / n - mean * mean, 0.0)
        std = np.sqrt(var)
        scale = np.where(std > 1e-8 * max(1.0, float(np.abs(mean).max())), std, 1.0)
        shift = mean
    elif mode == "scalar":
        ms = float(s2.sum() / n / d)
        scale = np.full(d, math.sqrt(ms) if ms > 0 else 1.0)
        shift = np.zeros(d)
    elif mode == "none":
        scale, shift = np.ones(d), np.zeros(d)
    else:
        raise ValueError(f"sae.normalize must be column, scalar or none, got {mode!r}")
    return Normalization(mode, shift, scale, (mean - shift) / scale, n)


# --------------------------------------------------------------------------- model


class ForwardOutput(NamedTuple):
    """What one training forward pass returns (all in normalised space)."""

    recon: torch.Tensor
    """Reconstruction x_hat_n [B, d_in]."""
    acts: torch.Tensor
    """Latent activations after BatchTopK [B, d_sae]."""
    loss: torch.Tensor
    """mse + aux_coef * aux_loss (what is minimised)."""
    mse: torch.Tensor
    """Mean squared error per element."""
    aux_loss: torch.Tensor
    """AuxK loss (0 when no latent is dead)."""
    fvu: torch.Tensor
    """Fraction of the batch's variance (around its mean) left unexplained."""
    indices: torch.Tensor
    """Flat indices (token * d_sae + latent) of the k x B kept activations."""
    values: torch.Tensor
    """Their values (some may be 0 when fewer than k x B pre-activations are positive)."""


def batch_topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values of the k x B largest entries of a [B, S] batch.

    Fast path: the 4k largest of every row are the candidates; when no row had all of its
    candidates chosen, nothing outside them can belong to the batch's top k x B, so the
    result is exact (up to ties); otherwise fall back to one top-k over the whole batch."""
    B, S = pre.shape
    n = min(k * B, pre.numel())
    m = min(S, 4 * k)
    if m < S:
        v, i = pre.topk(m, dim=1, sorted=False)
        top = v.flatten().topk(n, sorted=False)
        row = torch.div(top.indices, m, rounding_mode="floor")
        if int(torch.bincount(row, minlength=B).max()) < m:
            return row * S + i.flatten()[top.indices], top.values
    top = pre.flatten().topk(n, sorted=False)
    return top.indices, top.values


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k x B largest entries of a [B, S] batch, zero the rest (Bussmann et al.)."""
    idx, vals = batch_topk_indices(pre, k)
    return torch.zeros_like(pre).flatten().scatter_(0, idx, vals).view_as(pre)


class BatchTopKSAE(nn.Module):
    """The SAE. Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (unit-norm
    rows), b_dec [d_in]. Buffers: norm_shift, norm_scale [d_in], threshold (scalar)."""

    def __init__(self, d_in: int, d_sae: int, k: int, columns: Optional[list[str]] = None,
                 normalize: str = "column", seed: int = 0):
        super().__init__()
        if d_in < 1:
            raise ValueError(f"SAE input width must be >= 1, got {d_in}")
        if d_sae < 1:
            raise ValueError(f"SAE needs >= 1 latent, got {d_sae}")
        if not 1 <= k <= d_sae:
            raise ValueError(f"sae.k ({k}) must be between 1 and the number of latents ({d_sae} = "
                             f"{d_in} inputs x expansion)")
        if columns is not None and len(columns) != d_in:
            raise ValueError(f"{len(columns)} column names for an SAE of input width {d_in}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.columns = list(columns) if columns is not None else [f"c{i}" for i in range(d_in)]
        self.normalize_mode = normalize
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.t().clone())  # tied initialisation (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_shift", torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.ones(d_in))
        self.register_buffer("threshold", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg: SAEConfig, columns: list[str], seed: int = 0) -> "BatchTopKSAE":
        return cls(len(columns), len(columns) * cfg.expansion, cfg.k, columns, cfg.normalize, seed)

    def set_normalization(self, norm: Normalization) -> None:
        if len(norm.shift) != self.d_in:
            raise ValueError(f"normalisation of width {len(norm.shift)} for an SAE of width {self.d_in}")
        with torch.no_grad():
            self.norm_shift.copy_(torch.as_tensor(norm.shift, dtype=torch.float32))
            self.norm_scale.copy_(torch.as_tensor(norm.scale, dtype=torch.float32))
            self.b_dec.copy_(torch.as_tensor(norm.mean_n, dtype=torch.float32))
        self.normalize_mode = norm.mode

    # ---- pieces ----------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise SAEInputError(f"SAE input has shape {tuple(x.shape)}; expected [tokens, {self.d_in}] "
                                f"(columns {self.columns[0]}..{self.columns[-1]})")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (x - self.norm_shift) / self.norm_scale

    def denormalize(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n * self.norm_scale + self.norm_shift

    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_n - self.b_dec) @ self.W_enc + self.b_enc)

    def decode_n(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    # ---- inference (batch-independent) -------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [B, d_in] -> latents [B, d_sae]; a latent is on when its
        pre-activation exceeds the learned threshold (no other token matters)."""
        pre = self.pre_acts(self.normalize(x))
        return pre * (pre > self.threshold)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> reconstruction in the raw activation space."""
        return self.denormalize(self.decode_n(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- training ----------------------------------------------------------------------

    def train_forward(self, x_n: torch.Tensor, dead: Optional[torch.Tensor] = None,
                      aux_k: int = 0, aux_coef: float = 0.0) -> ForwardOutput:
        """One BatchTopK forward on a normalised batch, with the AuxK loss over `dead` latents."""
        pre = self.pre_acts(x_n)
        idx, vals = batch_topk_indices(pre, self.k)
        acts = torch.zeros_like(pre).flatten().scatter_(0, idx, vals).view_as(pre)
        recon = self.decode_n(acts)
        err = recon - x_n
        mse = err.pow(2).mean()
        var = (x_n - x_n.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.detach().pow(2).sum() / var
        aux = torch.zeros((), device=x_n.device)
        if dead is not None and aux_coef > 0 and bool(dead.any()):
            resid = (x_n - recon).detach()
            pre_dead = pre[:, dead]
            ka = min(aux_k, pre_dead.shape[1])
            top = pre_dead.topk(ka, dim=1)
            z = torch.zeros_like(pre_dead).scatter(1, top.indices, top.values)
            e_hat = z @ self.W_dec[dead]
            aux = (e_hat - resid).pow(2).sum() / resid.pow(2).sum().clamp_min(1e-12)
        return ForwardOutput(recon, acts, mse + aux_coef * aux, mse, aux, fvu, idx, vals)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each decoder row's gradient that would change its norm."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def renorm_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update_threshold(self, min_positive: float, rate: float) -> None:
        """Running estimate of the smallest activation BatchTopK keeps (first value taken as is)."""
        if not math.isfinite(min_positive):
            return
        if float(self.threshold) <= 0:
            self.threshold.fill_(min_positive)
        else:
            self.threshold.mul_(1 - rate).add_(rate * min_positive)

    # ---- save / load -------------------------------------------------------------------

    def cfg_dict(self, extra: Optional[dict] = None) -> dict:
        return {"format_version": FORMAT_VERSION, "architecture": "batchtopk", "d_in": self.d_in,
                "d_sae": self.d_sae, "k": self.k, "normalize": self.normalize_mode,
                "columns": self.columns, "threshold": float(self.threshold), **(extra or {})}

    def save(self, directory: str, fs: Optional[pafs.FileSystem] = None, extra: Optional[dict] = None) -> None:
        """Write `cfg.json` and `sae.safetensors` into `directory` (any pyarrow filesystem)."""
        fs = _fs(fs)
        fs.create_dir(directory, recursive=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_bytes_atomic(fs, f"{directory}/sae.safetensors", st_save(tensors))
        write_bytes_atomic(fs, f"{directory}/cfg.json", (json.dumps(self.cfg_dict(extra), indent=2) + "\n").encode())

    @classmethod
    def load(cls, directory: str, fs: Optional[pafs.FileSystem] = None) -> "BatchTopKSAE":
        fs = _fs(fs)
        with fs.open_input_stream(f"{directory}/cfg.json") as f:
            c = json.loads(f.read().decode())
        if c.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}/cfg.json: format_version {c.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")
        with fs.open_input_stream(f"{directory}/sae.safetensors") as f:
            tensors = st_load(f.read())
        sae = cls(c["d_in"], c["d_sae"], c["k"], c["columns"], c["normalize"])
        try:
            sae.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"{directory}/sae.safetensors does not match cfg.json: {e}") from None
        return sae


# --------------------------------------------------------------------------- training


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over `warmup` steps, constant, linear decay to 0 over the last
    `decay_frac` of `total` steps (`step` counts from 0)."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay = int(total * decay_frac)
    if decay > 0 and step >= total - decay:
        f *= max(0.0, (total - step) / decay)
    return f


class SAETrainer:
    """Adam steps on a `BatchTopKSAE`, dead-latent tracking and the inference threshold: the
    objective `rank1_core.harness` trains (see there for the protocol; one micro-batch per
    step). With torch.distributed initialised (several Ray Train workers), gradients are
    averaged and the threshold / firing record are reduced across workers, so every worker
    holds the same model."""

    name = "sae"
    sharded_checkpoint = False

    def __init__(self, sae: BatchTopKSAE, cfg: SAEConfig, total_steps: int, device: str = "cpu"):
        self.sae, self.cfg, self.total_steps = sae, cfg, total_steps
        self.rank, self.world_size = _world()
        self.device = torch.device(device)
        self.sae.to(self.device)
        self.aux_k = cfg.aux_k or max(1, sae.d_in // 2)
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.steps = 0
        """Optimizer steps done (the learning-rate schedule's position)."""
        self.tokens = 0
        """Tokens trained on, all workers."""
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=self.device)
        self._last: Optional[tuple[ForwardOutput, int]] = None

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_tokens

    @property
    def lr(self) -> float:
        cfg = self.cfg
        return cfg.lr * lr_factor(self.steps, self.total_steps, cfg.warmup_steps, cfg.decay_frac)

    def micro_step(self, x: torch.Tensor, last: bool = True) -> torch.Tensor:
        """Forward and backward of one batch: tensor [loss, mse, aux_loss, fvu, l0]."""
        x = x.to(self.device, torch.float32)
        out = self.sae.train_forward(self.sae.normalize(x), self.dead_mask(), self.aux_k, self.cfg.aux_coef)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self._last = (out, len(x))
        with torch.no_grad():
            on = out.values > 0
            return torch.stack([out.loss.detach(), out.mse.detach(), out.aux_loss.detach(), out.fvu,
                                on.sum().float() / len(x)])

    def step(self) -> float:
        """The optimizer step, then the firing record and the threshold from the batch's
        BatchTopK (its k x B kept entries only). The gradient norm is not measured: nan."""
        cfg, sae = self.cfg, self.sae
        out, n = self._last
        world = self.world_size
        if world > 1:
            for p in sae.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
        sae.remove_parallel_grads()
        lr = self.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        sae.renorm_decoder()

        with torch.no_grad():
            on = out.values > 0
            fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=self.device)
            fired[out.indices[on] % sae.d_sae] = True
            pos = out.values[on]
            min_pos = pos.min() if pos.numel() else torch.tensor(float("inf"), device=self.device)
            if world > 1:
                fired_i = fired.to(torch.int32)
                dist.all_reduce(fired_i, op=dist.ReduceOp.MAX)
                fired = fired_i.bool()
                dist.all_reduce(min_pos, op=dist.ReduceOp.MIN)
            n_tokens = n * world
            self.since_fired += n_tokens
            self.since_fired[fired] = 0
            sae.update_threshold(float(min_pos), cfg.threshold_ema)
        self.steps += 1
        self.tokens += n_tokens
        self._last = None
        return float("nan")

    def row(self, totals: list[float], count: float) -> dict:
        loss, mse, aux, fvu, l0 = (t / count for t in totals)
        return {"tokens": self.tokens, "loss": loss, "mse": mse, "aux_loss": aux, "fvu": fvu, "l0": l0,
                "dead_fraction": float(self.dead_mask().float().mean()), "threshold": float(self.sae.threshold)}

    def evaluate(self) -> None:
        return None

    def describe(self, row: dict) -> str:
        return f"sae loss {row['loss']:.4f} fvu {row['fvu']:.3f}"

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on one batch outside the harness (tests, benchmarks): its metrics."""
        stats = self.micro_step(x)
        lr = self.lr
        self.step()
        return {"step": self.steps, "lr": lr, **self.row(stats.tolist(), 1.0)}

    def state_dict(self) -> dict:
        return {"sae": {k: v.cpu() for k, v in self.sae.state_dict().items()}, "opt": self.opt.state_dict(),
                "step": self.steps, "tokens": self.tokens, "since_fired": self.since_fired.cpu(),
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.steps, self.tokens = int(state["step"]), int(state["tokens"])
        self.since_fired = state["since_fired"].to(self.device)

    def save(self, d) -> None:
        """A checkpoint folder (rank 0 writes): trainer state plus a loadable SAE (`cfg.json`,
        `sae.safetensors`)."""
        if self.rank == 0:
            with atomic_local_path(f"{d}/trainer.pt") as tmp:
                torch.save(self.state_dict(), tmp)
            self.export(d)

    def load(self, d) -> None:
        self.load_state_dict(torch.load(f"{d}/trainer.pt", map_location="cpu", weights_only=False))

    def export(self, d) -> None:
        if self.rank == 0:
            self.sae.save(str(d), extra={"step": self.steps, "tokens": self.tokens})


def steps_per_epoch(n_tokens: int, batch_size: int, world: int = 1) -> int:
    """Full batches each worker sees per epoch (every worker takes the same number of steps)."""
    return (n_tokens // world) // (batch_size // world)


def plan_steps(cfg: SAEConfig, n_tokens: int, shard_tokens: Optional[list[int]] = None) -> tuple[int, int]:
    """(steps per epoch, total steps) for `n_tokens` of data; with `shard_tokens` (tokens of
    each worker's own files) every worker stops at the smallest shard's batch count."""
    if shard_tokens is None:
        spe = steps_per_epoch(n_tokens, cfg.batch_size, cfg.num_workers)
    else:
        spe = min(shard_tokens) // (cfg.batch_size // cfg.num_workers)
    if spe < 1:
        raise SAEInputError(f"sae.batch_size ({cfg.batch_size}) exceeds the {n_tokens} tokens of "
                            f"activation data (split over {cfg.num_workers} worker(s)"
                            + (f", smallest share {min(shard_tokens)}" if shard_tokens else "")
                            + "); lower sae.batch_size")
    total = spe * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return spe, total


@dataclass
class BatchSteps:
    """Activation batches as the harness's step source: one batch (a dict with "x") per
    optimizer step, `spe` steps per epoch. `epoch_batches(epoch)` must give the same batches
    for the same epoch every time: a resumed run skips those its checkpoint has done."""

    epoch_batches: Callable[[int], Iterable[dict]]
    spe: int

    def epoch(self, epoch: int, start: int) -> tuple[int, Iterator[list[harness.Micro]]]:
        def steps() -> Iterator[list[harness.Micro]]:
            seen = 0
            for i, batch in enumerate(self.epoch_batches(epoch)):
                if i >= self.spe:
                    return
                seen = i + 1
                if i >= start:
                    yield [harness.Micro(batch["x"], len(batch["x"]))]
            if seen < self.spe:
                raise SAEInputError(f"epoch {epoch} gave {seen} batches, expected {self.spe}: "
                                    "the activation data changed while training")

        return self.spe, steps()


def run_training(trainer: SAETrainer, epoch_batches: Callable[[int], Iterable[dict]], spe: int,
                 state: Optional[harness.TrainState] = None, *,
                 report: Callable[[dict, harness.TrainState, bool], None] = lambda m, s, c: None,
                 progress: Optional[Callable[..., Any]] = None) -> harness.TrainState:
    """`rank1_core.harness.train` over `trainer` until `trainer.total_steps`, one batch of
    `epoch_batches(epoch)` per step (see `BatchSteps`); resumes mid-epoch from `state`."""
    return harness.train(trainer, BatchSteps(epoch_batches, spe), plan(trainer, spe), state, report=report,
                         progress=progress, name=trainer.name)


def plan(trainer: SAETrainer, spe: int) -> harness.Plan:
    """Epochs of `spe` steps until `trainer.total_steps`; a checkpoint every sae.checkpoint_every."""
    return harness.Plan(-(-trainer.total_steps // spe), trainer.total_steps, trainer.cfg.checkpoint_every)


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodeStats:
    """Sums over every encoded token, reduced across workers."""

    d_in: int
    d_sae: int
    tokens: int = 0
    count: np.ndarray = None
    """Tokens each latent fired on."""
    act_sum: np.ndarray = None
    act_max: np.ndarray = None
    sse_n: float = 0.0
    sse_raw: float = 0.0
    sum_n: np.ndarray = None
    sq_n: np.ndarray = None
    sum_raw: np.ndarray = None
    sq_raw: np.ndarray = None
    rows_written: int = 0

    def __post_init__(self) -> None:
        z = lambda n: np.zeros(n, np.float64)  # noqa: E731
        self.count = np.zeros(self.d_sae, np.int64)
        self.act_sum, self.act_max = z(self.d_sae), z(self.d_sae)
        self.sum_n, self.sq_n, self.sum_raw, self.sq_raw = z(self.d_in), z(self.d_in), z(self.d_in), z(self.d_in)

    def add(self, x: torch.Tensor, x_n: torch.Tensor, z: torch.Tensor, recon_n: torch.Tensor) -> None:
        f64 = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        self.tokens += len(x)
        self.count += f64((z > 0).sum(0)).astype(np.int64)
        self.act_sum += f64(z.sum(0))
        self.act_max = np.maximum(self.act_max, f64(z.max(0).values))
        self.sse_n += float((recon_n - x_n).double().pow(2).sum())
        self.sum_n += f64(x_n.sum(0))
        self.sq_n += f64(x_n.double().pow(2).sum(0))
        self.sum_raw += f64(x.sum(0))
        self.sq_raw += f64(x.double().pow(2).sum(0))

    def add_raw_error(self, err_raw: torch.Tensor) -> None:
        self.sse_raw += float(err_raw.double().pow(2).sum())

    def all_reduce(self) -> None:
        rank, world = _world()
        if world == 1:
            return
        vec = np.concatenate([[self.tokens, self.sse_n, self.sse_raw, self.rows_written], self.count,
                              self.act_sum, self.sum_n, self.sq_n, self.sum_raw, self.sq_raw]).astype(np.float64)
        dev = harness.comm_device()
        t = torch.from_numpy(vec).to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        mx = torch.from_numpy(self.act_max.copy()).to(dev)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        v = t.cpu().numpy()
        self.tokens, self.sse_n, self.sse_raw, self.rows_written = int(v[0]), float(v[1]), float(v[2]), int(v[3])
        o, S, D = 4, self.d_sae, self.d_in
        self.count = v[o:o + S].round().astype(np.int64); o += S
        self.act_sum = v[o:o + S]; o += S
        self.sum_n = v[o:o + D]; o += D
        self.sq_n = v[o:o + D]; o += D
        self.sum_raw = v[o:o + D]; o += D
        self.sq_raw = v[o:o + D]
        self.act_max = mx.cpu().numpy()

    def summary(self, live: np.ndarray) -> dict:
        n = max(self.tokens, 1)
        sst_n = float((self.sq_n - self.sum_n ** 2 / n).sum())
        sst_raw = float((self.sq_raw - self.sum_raw ** 2 / n).sum())
        fvu = self.sse_n / sst_n if sst_n > 0 else float("nan")
        return {
            "tokens": self.tokens,
            "fvu": fvu,
            "fve": 1.0 - fvu,
            "fvu_raw": self.sse_raw / sst_raw if sst_raw > 0 else float("nan"),
            "nmse": self.sse_raw / float(self.sq_raw.sum()) if self.sq_raw.sum() > 0 else float("nan"),
            "l0": float(self.count.sum()) / n,
            "latents": self.d_sae,
            "live_features": int(live.sum()),
            "dead_fraction": 1.0 - float(live.sum()) / self.d_sae,
            "feature_rows": self.rows_written,
        }


def sparse_rows(z: torch.Tensor, doc_id: np.ndarray, pos: np.ndarray, keep: torch.Tensor) -> pa.Table:
    """Dense latents [B, d_sae] -> one row per (token, kept latent) with a nonzero value."""
    zk = z * keep
    idx = zk.nonzero()
    i = idx[:, 0].cpu().numpy()
    j = idx[:, 1].cpu().numpy()
    vals = zk[idx[:, 0], idx[:, 1]].float().cpu().numpy()
    return pa.table([pa.array(doc_id[i], pa.int64()), pa.array(pos[i], pa.int32()),
                     pa.array(j.astype(np.int32), pa.int32()), pa.array(vals, pa.float32())],
                    schema=FEATURE_SCHEMA)


class FeatureWriter:
    """Sparse feature rows to `directory/part-<tag>-<n>.parquet`, about `rows_per_file` rows each."""

    def __init__(self, fs: Optional[pafs.FileSystem], directory: str, tag: str = "0",
                 rows_per_file: int = 2_000_000):
        self.fs, self.dir, self.tag, self.rows_per_file = _fs(fs), directory, tag, rows_per_file
        self.fs.create_dir(directory, recursive=True)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[str] = []
        self.rows = 0

    def write(self, tab: pa.Table) -> None:
        if tab.num_rows:
            self.pending.append(tab)
            self.pending_rows += tab.num_rows
        if self.pending_rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = f"{self.dir}/part-{self.tag}-{len(self.files):05d}.parquet"
        tab = pa.concat_tables(self.pending)
        write_parquet_atomic(self.fs, path, tab)
        self.files.append(path)
        self.rows += tab.num_rows
        self.pending, self.pending_rows = [], 0


@torch.no_grad()
def encode_batches(sae: BatchTopKSAE, batches: Iterable[dict], keep: np.ndarray,
                   writer: Optional[FeatureWriter] = None) -> EncodeStats:
    """Encode every token with the inference threshold; write rows of the `keep` latents;
    accumulate reconstruction and firing statistics (this worker's share, not reduced)."""
    sae.eval()
    device = sae.W_dec.device
    keep_t = torch.as_tensor(keep, dtype=torch.bool, device=device)
    stats = EncodeStats(sae.d_in, sae.d_sae)
    for b in batches:
        x = b["x"].to(device, torch.float32)
        x_n = sae.normalize(x)
        pre = sae.pre_acts(x_n)
        z = pre * (pre > sae.threshold)
        recon_n = sae.decode_n(z)
        stats.add(x, x_n, z, recon_n)
        stats.add_raw_error(sae.denormalize(recon_n) - x)
        if writer is not None:
            tab = sparse_rows(z, b["doc_id"], b["pos"], keep_t)
            stats.rows_written += tab.num_rows
            writer.write(tab)
    if writer is not None:
        writer.flush()
    return stats


def latents_table(sae: BatchTopKSAE, stats: EncodeStats, dead_in_training: np.ndarray,
                  kinds: Optional[list[str]] = None) -> pa.Table:
    """One row per latent: name, live, firing frequency and activation statistics, and the
    decoder row's norm over each component kind's columns (where the feature writes)."""
    n = max(stats.tokens, 1)
    count = stats.count
    live = (~dead_in_training) & (count > 0)
    cols: dict[str, Any] = {
        "feature": pa.array(np.arange(sae.d_sae, dtype=np.int32)),
        "name": pa.array([feature_name(i) for i in range(sae.d_sae)]),
        "live": pa.array(live),
        "dead_in_training": pa.array(dead_in_training),
        "count": pa.array(count.astype(np.int64)),
        "freq": pa.array(count / n),
        "mean_act": pa.array(np.where(count > 0, stats.act_sum / np.maximum(count, 1), 0.0)),
        "max_act": pa.array(stats.act_max),
    }
    if kinds is not None:
        W = sae.W_dec.detach().cpu().numpy()
        karr = np.asarray(kinds)
        for kind in sorted(set(kinds)):
            cols[f"dec_norm_{kind}"] = pa.array(np.linalg.norm(W[:, karr == kind], axis=1).astype(np.float64))
    return pa.table(cols)


def write_outputs(fs: Optional[pafs.FileSystem], stage_path: str, sae: BatchTopKSAE, state: harness.TrainState,
                  stats: EncodeStats, dead_in_training: np.ndarray, kinds: Optional[list[str]],
                  cfg: SAEConfig, norm: Normalization) -> dict:
    """cfg.json + sae.safetensors, latents.parquet, summary.json; returns the summary (the
    metrics are `harness.write_state`'s)."""
    fs = _fs(fs)
    sae.save(stage_path, fs, extra={"step": state.step, "tokens": state.tokens,
                                    "norm_tokens": norm.tokens, "sae_config": asdict(cfg)})
    lat = latents_table(sae, stats, dead_in_training, kinds)
    write_parquet_atomic(fs, f"{stage_path}/latents.parquet", lat)
    live = np.asarray(lat.column("live").to_pylist(), dtype=bool)
    summary = stats.summary(live)
    last = state.history[-1] if state.history else {}
    summary.update({"train_steps": state.step, "train_tokens": state.tokens,
                    "dead_in_training": int(dead_in_training.sum()),
                    "final_train_loss": last.get("loss"), "final_train_fvu": last.get("fvu"),
                    "threshold": float(sae.threshold), "d_in": sae.d_in, "k": sae.k})
    write_bytes_atomic(fs, f"{stage_path}/summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def job(args: dict, rank: int, world: int, device) -> harness.Job:
    """The sae stage's training in one worker, for `ray_jobs/harness.py`. `args`: sae (the
    section as a dict), columns, kinds, files, norm, seed, total_steps, steps_per_epoch,
    run_uri; with sae.loader ray_data, shards["train"] (this worker's Ray Data shard). The
    finish encodes every token of this worker's files into `features/` (files dealt out by
    rank: Ray Train's equal split would drop rows); rank 0 writes the SAE, latents and summary."""
    import pyarrow.fs as pafs

    from rank1_core.rundir import resolve_filesystem

    cfg = SAEConfig(**args["sae"])
    columns, seed = args["columns"], args["seed"]
    norm = Normalization.from_dict(args["norm"])
    sae = BatchTopKSAE.from_config(cfg, columns, seed=seed)
    sae.set_normalization(norm)
    trainer = SAETrainer(sae, cfg, args["total_steps"], device=str(device))
    fs, _ = resolve_filesystem(args["run_uri"])
    mine = args["files"][rank::world]  # this worker's files (pyarrow loader, and encoding)
    if cfg.loader == "ray_data":
        shard = args["shards"]["train"]
        collate = ColumnCollate(columns)
        shuffle = cfg.shuffle_buffer > 0

        def epoch_batches(epoch: int):
            return shard.iter_torch_batches(
                batch_size=cfg.batch_size // world, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=max(cfg.shuffle_buffer, cfg.batch_size // world) if shuffle else None,
                local_shuffle_seed=seed * 1000 + epoch if shuffle else None)
    else:
        def epoch_batches(epoch: int):
            return iter_activation_batches(fs, mine, columns, cfg.batch_size // world,
                                           shuffle_buffer=cfg.shuffle_buffer, seed=(seed, epoch, rank),
                                           drop_last=True)

    spe = args["steps_per_epoch"]

    def finish(stage, state: harness.TrainState) -> None:
        dead = trainer.dead_mask().cpu().numpy()
        features = stage.path("features")
        writer = FeatureWriter(stage.fs, features, tag=f"r{rank:03d}")
        for info in stage.fs.get_file_info(pafs.FileSelector(features, allow_not_found=True)):
            if info.base_name.startswith(f"part-r{rank:03d}-"):
                stage.fs.delete_file(info.path)
        stats = encode_batches(sae, iter_activation_batches(fs, mine, columns, cfg.encode_batch_size), ~dead, writer)
        stats.all_reduce()
        if rank == 0:
            write_outputs(stage.fs, stage.path(), sae, state, stats, dead, args["kinds"], cfg, norm)

    return harness.Job(trainer, BatchSteps(epoch_batches, spe), plan(trainer, spe), METRIC_COLUMNS, finish=finish,
                       bar=False)


# --------------------------------------------------------------------------- whole stage, no Ray


@dataclass
class StageInputs:
    """What the sae stage reads from the extract stage."""

    fs: pafs.FileSystem
    files: list[str]
    columns: list[str]
    kinds: list[str]
    rows: list[int]
    """Tokens of each file."""

    @property
    def tokens(self) -> int:
        return sum(self.rows)

    def shard(self, rank: int, world: int) -> list[str]:
        """Files of worker `rank` when workers read files themselves (dealt round-robin)."""
        return self.files[rank::world]

    def shard_tokens(self, world: int) -> list[int]:
        return [sum(self.rows[r::world]) for r in range(world)]

    @classmethod
    def from_extract(cls, fs: Optional[pafs.FileSystem], extract_path: str) -> "StageInputs":
        fs = _fs(fs)
        cat = read_catalogue(fs, f"{extract_path}/components.parquet")
        columns = cat.column("column").to_pylist()
        files = activation_files(fs, f"{extract_path}/activations")
        rows = check_activation_files(fs, files, columns)
        return cls(fs, files, columns, cat.column("kind").to_pylist(), rows)

    def batches(self, batch_size: int, **kw) -> Iterator[dict]:
        return iter_activation_batches(self.fs, self.files, self.columns, batch_size, **kw)

    def fit_normalization(self, cfg: SAEConfig) -> Normalization:
        return fit_normalization(self.batches(16_384, max_rows=cfg.norm_tokens), cfg.normalize, len(self.columns))


def train_local(cfg: SAEConfig, inputs: StageInputs, out_path: str, seed: int = 0,
                out_fs: Optional[pafs.FileSystem] = None,
                report: Callable[[dict, harness.TrainState, bool], None] = lambda m, s, c: None) -> dict:
    """The sae stage in one process with pyarrow streaming (tests, benchmarks, laptops):
    fit the normalisation, train, encode every token, write every output under `out_path`."""
    out_fs = _fs(out_fs)
    norm = inputs.fit_normalization(cfg)
    sae = BatchTopKSAE.from_config(cfg, inputs.columns, seed=seed)
    sae.set_normalization(norm)
    spe, total = plan_steps(cfg, inputs.tokens)
    trainer = SAETrainer(sae, cfg, total)
    state = run_training(trainer, lambda ep: inputs.batches(cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                                                            seed=(seed, ep, 0), drop_last=True), spe, report=report)
    dead = trainer.dead_mask().cpu().numpy()
    writer = FeatureWriter(out_fs, f"{out_path}/features")
    stats = encode_batches(sae, inputs.batches(cfg.encode_batch_size), ~dead, writer)
    harness.write_state(out_fs, out_path, state, METRIC_COLUMNS)
    return write_outputs(out_fs, out_path, sae, state, stats, dead, inputs.kinds, cfg, norm)
