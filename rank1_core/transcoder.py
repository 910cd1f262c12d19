"""Transcoder adapters: a sparse, interpretable approximation of how fine-tuning changed each MLP.

For every adapted decoder layer l of the *frozen base* model, a sparse branch reads the MLP's
input x (the post-attention RMSNorm output) and adds its output to the base MLP's output:

    z   = TopK(relu((x - x_mean) / x_scale @ W_enc + b_enc), k)   # k active latents per token
    mlp'(x) = mlp_base(x) + (z @ W_dec + b_dec) * out_scale        # W_dec, b_dec start at zero

so an untrained adapter is exactly the base model. x_mean, x_scale (RMS of the centred input)
and out_scale (RMS of the MLP difference to learn) are fitted on training tokens before the
first step (`fit_layer_stats`), so the branch works in unit-scale coordinates whatever the
model: Adam's steps are scale-free, and an MLP difference of 1e-3 would otherwise be
overshot at any usual learning rate. It is trained (`TranscoderTrainer`) so
that base + adapters matches a fine-tuned *target* model of the same architecture:

    loss = recon_coef    * mean_l FVU_l( a_l(x_l), d_l )            # each layer's MLP difference
         + kl_coef       * KL( p_target || p_adapted ) per token    # next-token distribution
         + sparsity_coef * mean_tokens sum_l sum_active z_i ||W_dec[i]||

where a_l is the branch's output and d_l the difference to reconstruct, with `recon`:
`difference`: target_mlp_l(x) - base_mlp_l(x) on the adapted model's own MLP input; `output`:
the target's MLP output in its own forward pass minus base_mlp_l(x). FVU_l is the squared
error over the variance of d_l (per batch), so every layer weighs the same.

Latent i of layer l is feature `l * d_latent + i` everywhere (Parquet, names `F%05d`, the
ablation API), whatever subset of layers is adapted.

Pieces (no `ray` here; `ray_jobs/transcoder*.py` wire them into Ray Train and Ray Data):

- `LayerAdapter`, `TranscoderAdapter` (`save`/`load`: `cfg.json` + `transcoder.safetensors`),
  `Installation` (forward hooks on a base model: enable/disable, record, ablate features);
- `TranscoderObjective` (the loss of one micro-batch; DDP wraps it), `TranscoderTrainer`
  (the objective `rank1_core.harness` trains: optimizer steps, checkpoints), `train_loop`,
  `job` (the stage's training in one worker);
- `faithfulness` (KL to the target with and without adapters, per-layer explained variance
  of the MLP difference, L0, agreement of the top token);
- `FeatureEncoder` (every token's active latents as sparse rows; a Ray Data actor);
- `TranscoderGenerationWorker` (benchmark generation with the adapters on, off or with
  features ablated; a Ray Data actor), `count_words` for hesitation counts.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from rank1_core import harness, lexicon
from rank1_core.config import TranscoderConfig
from rank1_core.harness import TrainState
from rank1_core.rundir import atomic_local_path, write_bytes_atomic

FORMAT_VERSION = 1
ARCHITECTURE = "transcoder_adapter"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "transcoder.safetensors"
TRAINER_FILE = "trainer.pt"
FEATURE_SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()),
                            ("feature", pa.int32()), ("value", pa.float32())])
TOKEN_SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()),
                          ("token", pa.string()), ("split", pa.string())])


class TranscoderError(RuntimeError):
    """A transcoder cannot be built, loaded or used as asked; the message says what and where."""


def feature_name(idx: int) -> str:
    """Name of a global feature index, as topk's SQL prints sparse features."""
    return f"F{idx:05d}"


# --------------------------------------------------------------------------- model access


def decoder_layers(model) -> list:
    """Decoder layers of a causal LM (Llama / Qwen2 / Mistral style), peft-wrapped or not."""
    from rank1_core.models import decoder

    try:
        m, dec = decoder(model)
    except ValueError as e:
        raise TranscoderError(str(e)) from None
    layers = dec.layers
    for i, layer in enumerate(layers):
        if not hasattr(layer, "mlp"):
            raise TranscoderError(f"{type(m).__name__}: decoder layer {i} has no .mlp")
    return list(layers)


def model_shape(model) -> tuple[int, int, int]:
    """(layers, hidden size, vocabulary size) of a causal LM."""
    c = model.config
    return int(c.num_hidden_layers), int(c.hidden_size), int(c.vocab_size)


# --------------------------------------------------------------------------- the adapter


class LayerAdapter(nn.Module):
    """The sparse branch of one MLP. Parameters W_enc [d_model, d_latent], b_enc [d_latent],
    W_dec [d_latent, d_model] and b_dec [d_model] (both zero at init); buffers x_mean [d_model],
    x_scale and out_scale (scalars; see the module docstring). Non-persistent buffer `keep`
    [d_latent] (1: on, 0: ablated)."""

    def __init__(self, d_model: int, d_latent: int, k: int, seed: int = 0):
        super().__init__()
        if d_model < 1 or d_latent < 1:
            raise TranscoderError(f"adapter needs d_model >= 1 and d_latent >= 1, got {d_model}, {d_latent}")
        if not 1 <= k <= d_latent:
            raise TranscoderError(f"transcoder.k ({k}) must be between 1 and the latents per layer ({d_latent})")
        self.d_model, self.d_latent, self.k = d_model, d_latent, k
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_model)
        self.W_enc = nn.Parameter((torch.rand(d_model, d_latent, generator=g) * 2 - 1) * bound)
        self.b_enc = nn.Parameter(torch.zeros(d_latent))
        self.W_dec = nn.Parameter(torch.zeros(d_latent, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("x_mean", torch.zeros(d_model))
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("keep", torch.ones(d_latent), persistent=False)
        self.ablating = False

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """relu((x - x_mean) / x_scale @ W_enc + b_enc) for x [N, d_model]."""
        xn = (x - self.x_mean.to(x.dtype)) / self.x_scale.to(x.dtype)
        return torch.relu(xn @ self.W_enc.to(x.dtype) + self.b_enc.to(x.dtype))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d_model] -> (values [N, k] float32, latent indices [N, k] int64), N = tokens.
        Values are >= 0 (0 when fewer than k pre-activations are positive); ablated latents
        read 0 (they keep their slot: ablation removes a feature, it does not promote another)."""
        pre = self.pre_acts(x.reshape(-1, self.d_model))
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        vals = vals.float()
        if self.ablating:
            vals = vals * self.keep[idx]
        return vals, idx

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(Sum of the active latents' decoder rows weighted by their values + b_dec) x out_scale."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec) * self.out_scale

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as a dense [N, d_latent] tensor (tests and analysis)."""
        vals, idx = self.encode(x)
        return torch.zeros(vals.shape[0], self.d_latent, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode(x)
        return self.decode(vals, idx).reshape(x.shape)

    def set_keep(self, latents: Iterable[int]) -> None:
        """Ablate `latents` (local indices); an empty set turns ablation off."""
        latents = sorted(set(int(i) for i in latents))
        with torch.no_grad():
            self.keep.fill_(1.0)
            if latents:
                self.keep[torch.as_tensor(latents, dtype=torch.long)] = 0.0
        self.ablating = bool(latents)


class TranscoderAdapter(nn.Module):
    """The adapters of every adapted layer, and what they were trained for (`meta`)."""

    def __init__(self, d_model: int, d_latent: int, k: int, layers: Sequence[int], num_layers: int,
                 seed: int = 0, meta: Optional[dict] = None):
        super().__init__()
        layers = sorted(int(i) for i in layers)
        if not layers:
            raise TranscoderError("a transcoder adapter needs at least one layer")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise TranscoderError(f"transcoder.layers: layer {bad[0]} is out of range for a model with "
                                  f"{num_layers} layers (valid: 0..{num_layers - 1})")
        self.d_model, self.d_latent, self.k = d_model, d_latent, k
        self.layers, self.num_layers = layers, num_layers
        self.meta = dict(meta or {})
        self.adapters = nn.ModuleDict({str(l): LayerAdapter(d_model, d_latent, k, seed=seed * 100_003 + l)
                                       for l in layers})

    @classmethod
    def for_model(cls, model, cfg: TranscoderConfig, seed: int = 0, meta: Optional[dict] = None) -> "TranscoderAdapter":
        n, d, _ = model_shape(model)
        layers = cfg.layers if cfg.layers is not None else range(n)
        return cls(d, cfg.expansion * d, cfg.k, layers, n, seed, meta)

    def layer(self, l: int) -> LayerAdapter:
        return self.adapters[str(l)]

    @property
    def n_features(self) -> int:
        """Size of the global feature index space (layers x d_latent, adapted or not)."""
        return self.num_layers * self.d_latent

    def feature(self, layer: int, latent: int) -> int:
        return layer * self.d_latent + latent

    def split_feature(self, feature: int) -> tuple[int, int]:
        return divmod(int(feature), self.d_latent)

    def set_ablation(self, features: Iterable[int]) -> None:
        """Ablate these global features (zero their activations) in every layer; [] = none."""
        per: dict[int, list[int]] = {l: [] for l in self.layers}
        for f in features:
            l, i = self.split_feature(f)
            if l not in per:
                raise TranscoderError(f"feature {feature_name(int(f))} is on layer {l}, which has no adapter "
                                      f"(adapted layers: {self.layers})")
            per[l].append(i)
        for l, idx in per.items():
            self.layer(l).set_keep(idx)

    @torch.no_grad()
    def set_layer_stats(self, stats: dict[int, "LayerStats"]) -> None:
        for l, st in stats.items():
            m = self.layer(l)
            m.x_mean.copy_(st.x_mean.to(m.x_mean.dtype))
            m.x_scale.fill_(st.x_scale)
            m.out_scale.fill_(st.out_scale)

    def install(self, model) -> "Installation":
        return Installation(self, model)

    # ---- save / load -----------------------------------------------------------------

    def cfg_dict(self, extra: Optional[dict] = None) -> dict:
        return {"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE, "d_model": self.d_model,
                "d_latent": self.d_latent, "k": self.k, "layers": self.layers, "num_layers": self.num_layers,
                "n_features": self.n_features, **self.meta, **(extra or {})}

    def save(self, directory: str, fs: Optional[pafs.FileSystem] = None, extra: Optional[dict] = None) -> None:
        """Write `cfg.json` and `transcoder.safetensors` into `directory` (any pyarrow filesystem)."""
        fs = fs or pafs.LocalFileSystem()
        fs.create_dir(directory, recursive=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_bytes_atomic(fs, f"{directory}/{WEIGHTS_FILE}", st_save(tensors))
        write_bytes_atomic(fs, f"{directory}/{CFG_FILE}",
                           (json.dumps(self.cfg_dict(extra), indent=2, default=str) + "\n").encode())

    @classmethod
    def load(cls, directory: str, fs: Optional[pafs.FileSystem] = None) -> "TranscoderAdapter":
        fs = fs or pafs.LocalFileSystem()
        c = read_cfg(directory, fs)
        with fs.open_input_stream(f"{directory}/{WEIGHTS_FILE}") as f:
            tensors = st_load(f.read())
        meta = {k: v for k, v in c.items() if k not in ("format_version", "architecture", "d_model", "d_latent", "k",
                                                         "layers", "num_layers", "n_features")}
        tc = cls(c["d_model"], c["d_latent"], c["k"], c["layers"], c["num_layers"], meta=meta)
        try:
            tc.load_state_dict(tensors)
        except RuntimeError as e:
            raise TranscoderError(f"{directory}/{WEIGHTS_FILE} does not match {CFG_FILE}: {e}") from None
        return tc


def read_cfg(directory: str, fs: Optional[pafs.FileSystem] = None) -> dict:
    """A saved transcoder's cfg.json, checked."""
    fs = fs or pafs.LocalFileSystem()
    for name in (CFG_FILE, WEIGHTS_FILE):
        if fs.get_file_info(f"{directory}/{name}").type == pafs.FileType.NotFound:
            raise TranscoderError(f"no transcoder adapter at {directory} (missing {name}): run the transcoder stage")
    with fs.open_input_stream(f"{directory}/{CFG_FILE}") as f:
        c = json.loads(f.read().decode())
    if c.get("architecture") != ARCHITECTURE:
        raise TranscoderError(f"{directory}/{CFG_FILE}: architecture {c.get('architecture')!r} is not {ARCHITECTURE!r}")
    if c.get("format_version") != FORMAT_VERSION:
        raise TranscoderError(f"{directory}/{CFG_FILE}: format_version {c.get('format_version')!r}, this code "
                              f"reads {FORMAT_VERSION}")
    return c


def is_transcoder_dir(path: str | Path) -> bool:
    p = Path(path) / CFG_FILE
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("architecture") == ARCHITECTURE
    except (OSError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- hooks


class LayerRecord(NamedTuple):
    """What one adapted MLP saw and did in a recorded forward pass (tokens flattened)."""

    x: torch.Tensor
    """MLP input [N, d_model]."""
    base_out: torch.Tensor
    """The base MLP's output [N, d_model] (before the branch is added)."""
    out: Optional[torch.Tensor]
    """The branch's output [N, d_model] (None when the adapters are disabled)."""
    vals: Optional[torch.Tensor]
    """Active latents' values [N, k]."""
    idx: Optional[torch.Tensor]
    """Their latent indices [N, k]."""


class Installation:
    """Forward hooks that add each layer's branch to the base model's MLP output.

    `enabled` (default True) switches every branch on or off; `record()` collects a
    `LayerRecord` per adapted layer; `ablate(features)` zeroes global features; `remove()`
    takes the hooks off again (the model is then untouched)."""

    def __init__(self, adapter: TranscoderAdapter, model):
        n, d, _ = model_shape(model)
        if d != adapter.d_model:
            raise TranscoderError(f"the transcoder was trained for hidden size {adapter.d_model}, the model has {d}")
        if n != adapter.num_layers:
            raise TranscoderError(f"the transcoder was trained for {adapter.num_layers} layers, the model has {n}")
        self.adapter = adapter
        self.enabled = True
        self.records: Optional[dict[int, LayerRecord]] = None
        layers = decoder_layers(model)
        self._handles = [layers[l].mlp.register_forward_hook(self._hook(l)) for l in adapter.layers]

    def _hook(self, l: int):
        mod = self.adapter.layer(l)

        def hook(_m, args, out):
            x = args[0]
            if not self.enabled:
                if self.records is not None:
                    self.records[l] = LayerRecord(x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]),
                                                  None, None, None)
                return None
            vals, idx = mod.encode(x)
            a = mod.decode(vals, idx)
            if self.records is not None:
                self.records[l] = LayerRecord(x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]), a, vals, idx)
            return out + a.reshape(out.shape).to(out.dtype)

        return hook

    @contextmanager
    def record(self) -> Iterator[dict[int, LayerRecord]]:
        self.records = {}
        try:
            yield self.records
        finally:
            self.records = None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    def ablate(self, features: Iterable[int]) -> None:
        self.adapter.set_ablation(features)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------- data


def position_masks(att: torch.Tensor, labels: torch.Tensor, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon mask, kl mask) [B, T] booleans. all: every real token for the reconstruction,
    every real token followed by one for the KL; assistant: the positions collate labelled
    (t whose next token is in the assistant turn) for both."""
    real = att.bool()
    if positions == "assistant":
        sel = labels != -100
        return sel, sel
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, 1:]
    return real, real & nxt


class LayerStats(NamedTuple):
    """Normalisation of one layer's branch, fitted on training tokens."""

    x_mean: torch.Tensor
    """Mean MLP input [d_model]."""
    x_scale: float
    """RMS per element of the centred MLP input."""
    out_scale: float
    """RMS per element of the MLP difference target_mlp(x) - base_mlp(x) (1 without a target)."""


@torch.no_grad()
def fit_layer_stats(model, inst: Installation, docs, pad_id: int, tokens: int, batch_tokens: int,
                    target=None) -> dict[int, LayerStats]:
    """`LayerStats` of each adapted layer over the first `tokens` real tokens of `docs`, the
    adapters disabled (at init they change nothing anyway)."""
    from rank1_core.train import collate, plan_microbatches

    A = inst.adapter
    s1 = {l: torch.zeros(A.d_model, dtype=torch.float64) for l in A.layers}
    s2 = {l: 0.0 for l in A.layers}
    dd = {l: 0.0 for l in A.layers}
    tl = decoder_layers(target) if target is not None else None
    n = 0
    dec = _decoder(model)
    dev = next(model.parameters()).device
    for mb in plan_microbatches([d.n for d in docs], batch_tokens, 0, 0, shuffle=False):
        ids, att, _ = collate([docs[i] for i in mb], pad_id)
        with inst.disabled(), inst.record() as rec:
            dec(input_ids=ids.to(dev), attention_mask=att.to(dev))
        m = att.reshape(-1).bool().to(dev)
        for l in A.layers:
            x = rec[l].x[m].double()
            s1[l] += x.sum(0).cpu()
            s2[l] += float(x.pow(2).sum())
            if tl is not None:
                d = tl[l].mlp(rec[l].x[m]).double() - rec[l].base_out[m].double()
                dd[l] += float(d.pow(2).sum())
        n += int(m.sum())
        if n >= tokens:
            break
    if n == 0:
        raise TranscoderError("no tokens to fit the adapters' input statistics on")
    out = {}
    for l in A.layers:
        mean = s1[l] / n
        var = max(s2[l] / n - float(mean.pow(2).sum()), 0.0) / A.d_model
        rms_d = math.sqrt(dd[l] / n / A.d_model) if tl is not None else 1.0
        out[l] = LayerStats(mean.float(), math.sqrt(var) if var > 0 else 1.0, rms_d if rms_d > 0 else 1.0)
    return out


def _decoder(model):
    from rank1_core.models import decoder

    return decoder(model)[1]


def _head(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.get_output_embeddings()


# --------------------------------------------------------------------------- the objective


STAT_NAMES = ("loss", "kl", "recon", "sparsity", "l0", "fve")


class TranscoderObjective(nn.Module):
    """The loss of one micro-batch. Holds the base model with the adapters installed (the
    adapters are its only trainable parameters) and, outside the module tree, the frozen
    target model (so DDP neither syncs nor broadcasts it). forward -> (loss, stats) where
    stats is a detached float tensor in the order of STAT_NAMES (fve: mean over layers of
    1 - FVU of the reconstruction)."""

    def __init__(self, base, target, adapter: TranscoderAdapter, cfg: TranscoderConfig):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        for p in target.parameters():
            p.requires_grad_(False)
        self.base = base
        self.adapter = adapter
        object.__setattr__(self, "_target", target)
        self.cfg = cfg
        self.inst = adapter.install(base)
        nb, db, vb = model_shape(base)
        nt, dt, vt = model_shape(target)
        if (nb, db, vb) != (nt, dt, vt):
            raise TranscoderError(f"base and target differ in shape: base has {nb} layers, hidden {db}, vocab "
                                  f"{vb}; target has {nt}, {dt}, {vt}")
        self._target_layers = decoder_layers(target)
        self._autocast = False

    @property
    def target(self):
        return self._target

    def autocast(self, on: bool) -> None:
        self._autocast = on

    def _ac(self, device):
        import contextlib

        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def forward(self, ids, att, labels):
        cfg = self.cfg
        dev = ids.device
        rmask, kmask = position_masks(att, labels, cfg.positions)
        tgt_out: dict[int, torch.Tensor] = {}
        hooks = []
        if cfg.recon == "output" and cfg.recon_coef > 0:
            for l in self.adapter.layers:
                hooks.append(self._target_layers[l].mlp.register_forward_hook(
                    lambda _m, _a, out, l=l: tgt_out.__setitem__(l, out.reshape(-1, out.shape[-1]).detach())))
        try:
            with torch.no_grad(), self._ac(dev):
                ht = _decoder(self.target)(input_ids=ids, attention_mask=att).last_hidden_state
                logp_t = F.log_softmax(_head(self.target)(ht[kmask]).float(), dim=-1)
        finally:
            for h in hooks:
                h.remove()
        with self._ac(dev), self.inst.record() as rec:
            h = _decoder(self.base)(input_ids=ids, attention_mask=att).last_hidden_state
            logp = F.log_softmax(_head(self.base)(h[kmask]).float(), dim=-1)
        n_kl = max(int(kmask.sum()), 1)
        kl = (logp_t.exp() * (logp_t - logp)).sum() / n_kl
        flat = rmask.reshape(-1)
        n_tok = max(int(flat.sum()), 1)
        fvus, sparsity, l0 = [], torch.zeros((), device=dev), 0.0
        for l in self.adapter.layers:
            r = rec[l]
            a = r.out[flat].float()
            with torch.no_grad():
                d = self._difference(l, r, flat, tgt_out)
                var = (d - d.mean(0)).pow(2).sum().clamp_min(1e-12)
            fvus.append((a - d).pow(2).sum() / var)
            vals = r.vals[flat]
            if cfg.sparsity_coef > 0:
                norms = self.adapter.layer(l).W_dec.norm(dim=1)
                sparsity = sparsity + (vals * norms[r.idx[flat]]).sum() / n_tok
            l0 += float((vals > 0).sum()) / n_tok
        recon = torch.stack(fvus).mean()
        loss = cfg.recon_coef * recon + cfg.kl_coef * kl + cfg.sparsity_coef * sparsity
        n_layers = len(self.adapter.layers)
        stats = torch.tensor([float(loss.detach()), float(kl.detach()), float(recon.detach()),
                              float(sparsity.detach()), l0 / n_layers, 1.0 - float(recon.detach())])
        return loss, stats

    @torch.no_grad()
    def _difference(self, l: int, r: LayerRecord, flat, tgt_out) -> torch.Tensor:
        base_out = r.base_out[flat].float()
        if self.cfg.recon == "output":
            return tgt_out[l][flat].float() - base_out
        x = r.x[flat]
        with self._ac(x.device):
            t = self._target_layers[l].mlp(x)
        return t.float() - base_out


# --------------------------------------------------------------------------- training


METRIC_COLUMNS = ("step", "epoch", *STAT_NAMES, "lr", "grad_norm", "tokens", "tokens_per_s", "wall")


def doc_steps(docs, cfg: TranscoderConfig, seed: int, pad_id: int, rank: int = 0, world: int = 1):
    """The training traces as the harness's step source (the same plan as the `train` stage)."""
    from rank1_core.train import DocSteps

    return DocSteps(docs, cfg.batch_tokens, cfg.grad_accum, seed, pad_id, rank, world)


def total_steps(docs, cfg: TranscoderConfig, seed: int, world: int) -> int:
    return doc_steps(docs, cfg, seed, 0, 0, world).total(cfg.epochs, cfg.max_steps)


class TranscoderTrainer(harness.TorchOptimizer):
    """Adam on the adapters of a `TranscoderObjective`, DDP-wrapped when a process group of
    more than one rank exists; gradient accumulation, clipping, warm-up + decay. The objective
    `rank1_core.harness` trains (see there for the protocol)."""

    name = "transcoder"
    sharded_checkpoint = False

    def __init__(self, objective: TranscoderObjective, cfg: TranscoderConfig, total: int, rank: int = 0,
                 world: int = 1, device="cpu"):
        from rank1_core.train import lr_lambda

        self.obj, self.cfg, self.total, self.rank, self.world_size = objective, cfg, total, rank, world
        self.device = torch.device(device)
        objective.to(self.device)
        objective.target.to(self.device)
        objective.autocast(cfg.precision == "bf16_autocast")
        self.params = list(objective.adapter.parameters())
        self.max_grad_norm = cfg.max_grad_norm
        self.wrapped = harness.ddp(objective, world, self.device)
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total, cfg.warmup_ratio, cfg.lr_schedule))

    def micro_step(self, batch, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (`rank1_core.train.DocBatch`); its
        statistics in the order of STAT_NAMES."""
        ids, att, labels = (t.to(self.device) for t in batch[:3])
        with harness.grad_sync(self.wrapped, last):
            loss, stats = self.wrapped(ids, att, labels)
            (loss / self.cfg.grad_accum).backward()
        return stats

    def row(self, totals: list[float], count: float) -> dict:
        """The statistics' means over the step's micro-batches (all workers)."""
        return {k: v / count for k, v in zip(STAT_NAMES, totals)}

    def evaluate(self) -> None:
        return None

    def describe(self, row: dict) -> str:
        return f"transcoder kl {row['kl']:.4f} fve {row['fve']:.3f}"

    def save(self, d: Path) -> None:
        """This checkpoint's trainer state plus a loadable adapter (rank 0 writes)."""
        if self.rank != 0:
            return
        with atomic_local_path(d / TRAINER_FILE) as tmp:
            torch.save({"adapter": {k: v.cpu() for k, v in self.obj.adapter.state_dict().items()},
                        "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, tmp)
        self.export(d / "adapter")

    def load(self, d: Path) -> None:
        f = d / TRAINER_FILE
        if not f.exists():
            raise TranscoderError(f"checkpoint {d} has no {TRAINER_FILE}")
        blob = torch.load(f, map_location="cpu", weights_only=False)
        self.obj.adapter.load_state_dict(blob["adapter"])
        self.obj.adapter.to(self.device)
        self.opt.load_state_dict(blob["opt"])
        self.sched.load_state_dict(blob["sched"])

    def export(self, d: Path) -> None:
        if self.rank == 0:
            self.obj.adapter.save(str(d))


def train_loop(trainer: TranscoderTrainer, docs, cfg: TranscoderConfig, seed: int, pad_id: int,
               state: Optional[TrainState] = None, *,
               report: Callable[[dict, TrainState, bool], None] = lambda m, s, c: None,
               progress: Optional[Callable[..., Any]] = None) -> TrainState:
    """`rank1_core.harness.train` over `trainer`: train to the last epoch (or cfg.max_steps)."""
    source = doc_steps(docs, cfg, seed, pad_id, trainer.rank, trainer.world_size)
    plan = harness.Plan(cfg.epochs, source.total(cfg.epochs, cfg.max_steps), cfg.checkpoint_every)
    return harness.train(trainer, source, plan, state, report=report, progress=progress, name=trainer.name)


def metrics_table(history: list[dict]) -> pa.Table:
    return harness.metrics_table(history, METRIC_COLUMNS)


def job(args: dict, rank: int, world: int, device) -> harness.Job:
    """The `transcoder` stage's training in one worker, for `ray_jobs/harness.py`. `args`:
    config (a dict), base_dir, target_dir, tokens (prepare's tokens URI). A fresh run first
    fits each branch's statistics (`fit_layer_stats`); the finish writes `adapter/`, and rank 0
    measures `faithfulness.json` / `faithfulness_layers.parquet` on the held-out traces."""
    import shutil
    import tempfile

    from rank1_core.config import config_from_dict
    from rank1_core.generation import local_dir
    from rank1_core.models import load_model, load_tokenizer
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.train import load_docs

    cfg = config_from_dict(args["config"])
    tc = cfg.transcoder
    fs, path = resolve_filesystem(args["tokens"])
    train_docs, held = load_docs(fs, path, "train"), load_docs(fs, path, "heldout")
    if tc.heldout_docs:
        held = held[:tc.heldout_docs]
    pad = load_tokenizer(args["base_dir"]).pad_token_id
    tmp_models = tempfile.mkdtemp(prefix="rank1-tc-target-")
    base = load_model(args["base_dir"])
    target = load_model(local_dir(args["target_dir"], tmp_models))
    meta = {"base_model": cfg.model.name, "target": tc.target, "target_dir": args["target_dir"], "recon": tc.recon,
            "positions": tc.positions, "expansion": tc.expansion}
    adapter = TranscoderAdapter.for_model(base, tc, seed=cfg.run.seed, meta=meta)
    obj = TranscoderObjective(base, target, adapter, tc)
    source = doc_steps(train_docs, tc, cfg.run.seed, pad, rank, world)
    plan = harness.Plan(tc.epochs, source.total(tc.epochs, tc.max_steps), tc.checkpoint_every)
    trainer = TranscoderTrainer(obj, tc, plan.limit, rank, world, device)

    def start() -> None:
        # Same data and weights on every rank, so every rank fits the same statistics.
        adapter.set_layer_stats(fit_layer_stats(base, obj.inst, train_docs, pad, tc.init_tokens, tc.batch_tokens,
                                                target=target))

    def finish(stage, state: TrainState) -> None:
        harness.export(trainer, stage, "adapter")
        if rank == 0:
            summary, layers = faithfulness(base, target, obj.inst, held, pad, tc.batch_tokens, tc.positions,
                                           autocast=tc.precision == "bf16_autocast")
            stage.write_json("faithfulness.json", summary)
            stage.write_parquet("faithfulness_layers.parquet", layers)
        shutil.rmtree(tmp_models, ignore_errors=True)

    return harness.Job(trainer, source, plan, METRIC_COLUMNS, start=start, finish=finish)


# --------------------------------------------------------------------------- faithfulness


LAYER_COLUMNS = ("layer", "tokens", "fve_difference", "fvu_difference", "diff_norm", "adapter_norm", "l0",
                 "live_latents", "d_latent")


@torch.no_grad()
def faithfulness(base, target, inst: Installation, docs, pad_id: int, batch_tokens: int, positions: str = "all",
                 autocast: bool = False) -> tuple[dict, pa.Table]:
    """How well base + adapters stands in for the target on `docs` (teacher-forced).

    Summary: kl_adapted = KL(target || base + adapters) and kl_base = KL(target || base) in
    nats per token (kl_closed = 1 - kl_adapted / kl_base), cross-entropy of the data under
    each model, agreement of the top next token with the target, L0. Per layer: the explained
    variance of the MLP difference d = target_mlp(x) - base_mlp(x) at the adapted model's
    input x by the branch's output a: fve = 1 - sum|a - d|^2 / sum|d - mean d|^2."""
    import contextlib

    from rank1_core.train import collate, plan_microbatches

    dev = next(base.parameters()).device
    ac = (lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    tl = decoder_layers(target)
    A = inst.adapter
    acc = {"n_kl": 0, "kl_adapted": 0.0, "kl_base": 0.0, "ce_adapted": 0.0, "ce_base": 0.0, "ce_target": 0.0,
           "n_ce": 0, "agree_adapted": 0, "agree_base": 0}
    L = {l: {"n": 0, "sse": 0.0, "s1": torch.zeros(A.d_model, dtype=torch.float64), "s2": 0.0, "dn": 0.0,
             "an": 0.0, "l0": 0, "fired": torch.zeros(A.d_latent, dtype=torch.bool)} for l in A.layers}
    mbs = plan_microbatches([d.n for d in docs], batch_tokens, 0, 0, shuffle=False)
    for mb in mbs:
        ids, att, labels = (t.to(dev) for t in collate([docs[i] for i in mb], pad_id))
        rmask, kmask = position_masks(att, labels, positions)
        with ac():
            lt = _head(target)(_decoder(target)(input_ids=ids, attention_mask=att).last_hidden_state[kmask]).float()
            with inst.disabled():
                lb = _head(base)(_decoder(base)(input_ids=ids, attention_mask=att).last_hidden_state[kmask]).float()
            with inst.record() as rec:
                la = _head(base)(_decoder(base)(input_ids=ids, attention_mask=att).last_hidden_state[kmask]).float()
        pt = F.log_softmax(lt, -1)
        for name, lx in (("adapted", la), ("base", lb)):
            px = F.log_softmax(lx, -1)
            acc[f"kl_{name}"] += float((pt.exp() * (pt - px)).sum())
            acc[f"agree_{name}"] += int((lx.argmax(-1) == lt.argmax(-1)).sum())
        acc["n_kl"] += int(kmask.sum())
        lab = labels.masked_fill(~kmask, -100) if positions == "all" else labels
        csel = lab[kmask] != -100
        nxt = lab[kmask][csel]
        for name, lx in (("adapted", la), ("base", lb), ("target", lt)):
            acc[f"ce_{name}"] += float(F.cross_entropy(lx[csel], nxt, reduction="sum")) if len(nxt) else 0.0
        acc["n_ce"] += int(csel.sum())
        flat = rmask.reshape(-1)
        for l in A.layers:
            r = rec[l]
            x = r.x[flat]
            with ac():
                t = tl[l].mlp(x)
            d = t.double() - r.base_out[flat].double()
            a = r.out[flat].double()
            s = L[l]
            s["n"] += len(d)
            s["sse"] += float((a - d).pow(2).sum())
            s["s1"] += d.sum(0).cpu()
            s["s2"] += float(d.pow(2).sum())
            s["dn"] += float(d.norm(dim=-1).sum())
            s["an"] += float(a.norm(dim=-1).sum())
            v = r.vals[flat]
            s["l0"] += int((v > 0).sum())
            s["fired"][r.idx[flat][v > 0].unique().cpu()] = True
    n = max(acc["n_kl"], 1)
    nc = max(acc["n_ce"], 1)
    rows = []
    for l in A.layers:
        s = L[l]
        sst = s["s2"] - float((s["s1"] ** 2).sum()) / max(s["n"], 1)
        fvu = s["sse"] / sst if sst > 0 else float("nan")
        rows.append({"layer": l, "tokens": s["n"], "fve_difference": 1.0 - fvu, "fvu_difference": fvu,
                     "diff_norm": s["dn"] / max(s["n"], 1), "adapter_norm": s["an"] / max(s["n"], 1),
                     "l0": s["l0"] / max(s["n"], 1), "live_latents": int(s["fired"].sum()), "d_latent": A.d_latent})
    kl_a, kl_b = acc["kl_adapted"] / n, acc["kl_base"] / n
    fves = [r["fve_difference"] for r in rows if r["fve_difference"] == r["fve_difference"]]
    summary = {
        "tokens": acc["n_kl"], "kl_adapted": kl_a, "kl_base": kl_b,
        "kl_closed": 1.0 - kl_a / kl_b if kl_b > 0 else float("nan"),
        "ce_adapted": acc["ce_adapted"] / nc, "ce_base": acc["ce_base"] / nc, "ce_target": acc["ce_target"] / nc,
        "top1_agree_adapted": acc["agree_adapted"] / n, "top1_agree_base": acc["agree_base"] / n,
        "fve_difference_mean": float(np.mean(fves)) if fves else float("nan"),
        "l0_per_layer": float(np.mean([r["l0"] for r in rows])),
        "live_latents": int(sum(r["live_latents"] for r in rows)),
        "latents": len(rows) * A.d_latent, "positions": positions,
    }
    table = pa.table({c: [r[c] for r in rows] for c in LAYER_COLUMNS})
    return summary, table


# --------------------------------------------------------------------------- features


class FeatureEncoder:
    """Every token's active adapter latents as sparse rows (doc_id, pos, feature, value), the
    SAE's feature layout, plus the token table (doc_id, pos, token_id, token, split). A Ray
    Data callable class: `__call__` writes one file per batch of documents into
    `<out>/features/` and `<out>/tokens/` (named by the batch's documents, renamed into place;
    tokens last, so a batch is done when its token file exists) and returns a summary row."""

    def __init__(self, model_dir, transcoder_dir: str, out_uri: Optional[str] = None, *, batch_tokens: int = 4096,
                 dtype: str = "float32", device: str = "cpu", torch_threads: Optional[int] = None,
                 splits: Sequence[str] = ("train", "heldout")):
        from rank1_core.config import ModelConfig
        from rank1_core.models import load_model, load_tokenizer, resolve_model_dir

        if isinstance(model_dir, ModelConfig):
            model_dir = resolve_model_dir(model_dir)
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        fs, path = _fs_path(transcoder_dir)
        self.adapter = TranscoderAdapter.load(path, fs)
        self.model = load_model(model_dir, dtype=dtype, device=device)
        self.adapter.to(device)
        self.inst = self.adapter.install(self.model)
        self.tokenizer = load_tokenizer(model_dir)
        self.device, self.batch_tokens, self.splits = device, batch_tokens, set(splits)
        self.out = None
        if out_uri is not None:
            self.out = _fs_path(out_uri)
        self._text: dict[int, str] = {}

    def token_texts(self, ids: np.ndarray) -> list[str]:
        new = [int(t) for t in np.unique(ids) if int(t) not in self._text]
        for t, s in zip(new, self.tokenizer.batch_decode([[t] for t in new])):
            self._text[t] = s
        return [self._text[int(t)] for t in ids]

    @torch.no_grad()
    def compute(self, doc_ids: Sequence[int], input_ids: Sequence[Sequence[int]],
                splits: Optional[Sequence[str]] = None) -> tuple[pa.Table, pa.Table]:
        """(features, tokens) of these documents, rows sorted by (doc_id, pos[, feature])."""
        from rank1_core.activations import plan_forward_batches

        docs = [np.asarray(x, dtype=np.int64) for x in input_ids]
        lengths = [len(d) for d in docs]
        A = self.adapter
        parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        dec = _decoder(self.model)
        for group in plan_forward_batches(lengths, self.batch_tokens):
            group = [i for i in group if lengths[i] > 0]
            if not group:
                continue
            width = max(lengths[i] for i in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            for r, i in enumerate(group):
                ids[r, :lengths[i]] = torch.from_numpy(docs[i])
            with self.inst.record() as rec:  # right padding: causal attention never sees it
                dec(input_ids=ids.to(self.device), use_cache=False)
            per_layer = []
            for l in A.layers:
                v = rec[l].vals.reshape(len(group), width, A.k).cpu().numpy()
                f = (rec[l].idx.reshape(len(group), width, A.k).cpu().numpy() + l * A.d_latent).astype(np.int32)
                per_layer.append((v, f))
            V = np.concatenate([p[0] for p in per_layer], axis=-1)  # [B, T, layers*k]
            Fi = np.concatenate([p[1] for p in per_layer], axis=-1)
            for r, i in enumerate(group):
                v, f = V[r, :lengths[i]], Fi[r, :lengths[i]]
                tok, slot = np.nonzero(v > 0)
                order = np.lexsort((f[tok, slot], tok))
                parts[i] = (tok[order].astype(np.int32), f[tok, slot][order], v[tok, slot][order].astype(np.float32))
        order = [i for i in sorted(range(len(docs)), key=lambda i: int(doc_ids[i])) if lengths[i] > 0]
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        feats = pa.table({
            "doc_id": pa.array(cat([np.full(len(parts[i][0]), int(doc_ids[i])) for i in order], np.int64)),
            "pos": pa.array(cat([parts[i][0] for i in order], np.int32)),
            "feature": pa.array(cat([parts[i][1] for i in order], np.int32)),
            "value": pa.array(cat([parts[i][2] for i in order], np.float32)),
        }, schema=FEATURE_SCHEMA)
        tok_ids = cat([docs[i] for i in order], np.int32)
        tokens = pa.table({
            "doc_id": pa.array(cat([np.full(lengths[i], int(doc_ids[i])) for i in order], np.int64)),
            "pos": pa.array(cat([np.arange(lengths[i]) for i in order], np.int32)),
            "token_id": pa.array(tok_ids),
            "token": pa.array(self.token_texts(tok_ids), pa.string()),
            "split": pa.array([str(splits[i]) if splits is not None else "" for i in order for _ in range(lengths[i])],
                              pa.string()),
        }, schema=TOKEN_SCHEMA)
        return feats, tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rank1_core.activations import batch_name, write_atomic

        if self.out is None:
            raise TranscoderError("FeatureEncoder was built without out_uri; call compute() instead")
        fs, root = self.out
        keep = [i for i, s in enumerate(batch["split"]) if s in self.splits]
        doc_ids = [int(batch["doc_id"][i]) for i in keep]
        summary = {"file": [""], "docs": [len(doc_ids)], "tokens": [0], "rows": [0], "skipped": [False]}
        if doc_ids:
            name = batch_name(doc_ids)
            summary["file"] = [name]
            if fs.get_file_info(f"{root}/tokens/{name}").type == pafs.FileType.File:
                with fs.open_input_file(f"{root}/tokens/{name}") as f:
                    import pyarrow.parquet as pq

                    summary["tokens"], summary["skipped"] = [pq.ParquetFile(f).metadata.num_rows], [True]
            else:
                feats, tokens = self.compute(doc_ids, [batch["input_ids"][i] for i in keep],
                                             [str(batch["split"][i]) for i in keep])
                write_atomic(fs, f"{root}/features/{name}", feats, "zstd")
                write_atomic(fs, f"{root}/tokens/{name}", tokens, "zstd", use_dictionary=["token", "split"])
                summary["tokens"], summary["rows"] = [tokens.num_rows], [feats.num_rows]
        return {k: np.asarray(v) for k, v in summary.items()}


def _fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    from rank1_core.rundir import resolve_filesystem

    return resolve_filesystem(str(uri))


def latents_table(adapter: TranscoderAdapter, counts: dict[int, tuple[int, float, float]], tokens: int) -> pa.Table:
    """One row per latent of every adapted layer (the SAE's latents table plus layer/latent):
    feature, name, layer, latent, live (fired at least once), count, freq, mean_act, max_act,
    dec_norm, enc_norm. `counts`: feature -> (tokens fired, sum of values, max value)."""
    rows = {c: [] for c in ("feature", "name", "layer", "latent", "live", "count", "freq", "mean_act", "max_act",
                            "dec_norm", "enc_norm")}
    n = max(tokens, 1)
    for l in adapter.layers:
        m = adapter.layer(l)
        dn = m.W_dec.detach().float().norm(dim=1).cpu().numpy()
        en = m.W_enc.detach().float().norm(dim=0).cpu().numpy()
        for i in range(adapter.d_latent):
            f = adapter.feature(l, i)
            c, s, mx = counts.get(f, (0, 0.0, 0.0))
            rows["feature"].append(f)
            rows["name"].append(feature_name(f))
            rows["layer"].append(l)
            rows["latent"].append(i)
            rows["live"].append(c > 0)
            rows["count"].append(int(c))
            rows["freq"].append(c / n)
            rows["mean_act"].append(s / c if c else 0.0)
            rows["max_act"].append(float(mx))
            rows["dec_norm"].append(float(dn[i]))
            rows["enc_norm"].append(float(en[i]))
    types = {"feature": pa.int32(), "name": pa.string(), "layer": pa.int32(), "latent": pa.int32(), "live": pa.bool_(),
             "count": pa.int64()}
    return pa.table({c: pa.array(v, types.get(c, pa.float64())) for c, v in rows.items()})


# --------------------------------------------------------------------------- hesitation


def normalize_word(token: str) -> str:
    """Letters of a token, lower-cased: ' Wait,' -> 'wait'."""
    return "".join(c for c in token.lower() if c.isalpha())


HESITATION_COLUMNS = ("feature", "name", "layer", "latent", "contexts", "matches", "share", "selected", "freq",
                      "max_act", "top_tokens", "next_tokens")


def feature_summary(con, features_view: str) -> dict[int, tuple[int, float, float]]:
    """feature -> (tokens it fired on, sum of its values, max value), from a sparse view."""
    rows = con.execute(f'SELECT feature, count(*), sum(value::DOUBLE), max(value) FROM "{features_view}" '
                       "GROUP BY feature").fetchall()
    return {int(f): (int(c), float(s), float(m)) for f, c, s, m in rows}


def hesitation_candidates(con, features_view: str, tokens_view: str, hcfg, log: Callable[[str], None] = print):
    """Rank every feature's top positive contexts with topk's SQL (at most one per document)
    and count how many are hesitation words (queries/transcoder_hesitation.sql). Returns a
    pandas DataFrame: feature (int), contexts, matches, share, top_tokens, next_tokens."""
    from rank1_core import sql as S
    from rank1_core.config import TopkConfig
    from rank1_core.topk import Source, rank_source

    con.execute("CREATE OR REPLACE TABLE acc_summary (feature VARCHAR, doc_id BIGINT, n BIGINT, "
                "sum DOUBLE, sumsq DOUBLE, hi FLOAT, lo FLOAT, n_active BIGINT)")
    con.execute("CREATE OR REPLACE TABLE acc_hits (feature VARCHAR, sign VARCHAR, rank INTEGER, "
                "doc_id BIGINT, pos INTEGER, value FLOAT, window_pos INTEGER[], window_values FLOAT[])")
    tk = TopkConfig(k=hcfg.contexts, max_per_doc=1, window_before=0, window_after=0)
    rank_source(con, Source("transcoder", features_view, "sparse"), tk, log)
    con.execute("CREATE OR REPLACE TEMP VIEW hits AS SELECT * FROM acc_hits")
    if tokens_view != "tokens":
        con.execute(f'CREATE OR REPLACE TEMP VIEW tokens AS SELECT * FROM "{tokens_view}"')
    words = sorted({normalize_word(w) for w in hcfg.words})
    df = S.run_query(con, "transcoder_hesitation", {"contexts": hcfg.contexts, "words": words,
                                                    "match": hcfg.match}).df()
    df["feature"] = [int(f[1:]) for f in df["feature"]]
    return df


def select_hesitation(cands, hcfg) -> list[int]:
    """Features whose share of hesitation contexts reaches min_share (with at least
    min_contexts contexts), highest share first (then most matches), capped by max_features."""
    ok = cands[(cands["share"] >= hcfg.min_share) & (cands["contexts"] >= hcfg.min_contexts)]
    ok = ok.sort_values(["share", "matches", "feature"], ascending=[False, False, True])
    feats = [int(f) for f in ok["feature"]]
    return feats[:hcfg.max_features] if hcfg.max_features else feats


def hesitation_table(cands, selected: Sequence[int], latents: pa.Table) -> pa.Table:
    """Candidates with at least one hesitation context (and every selected feature), joined
    with the latents table: HESITATION_COLUMNS."""
    lat = latents.to_pandas().set_index("feature")
    sel = set(int(f) for f in selected)
    df = cands[(cands["matches"] > 0) | cands["feature"].isin(sel)].copy()
    df["name"] = [feature_name(f) for f in df["feature"]]
    df["layer"] = [int(lat.at[f, "layer"]) for f in df["feature"]]
    df["latent"] = [int(lat.at[f, "latent"]) for f in df["feature"]]
    df["freq"] = [float(lat.at[f, "freq"]) for f in df["feature"]]
    df["max_act"] = [float(lat.at[f, "max_act"]) for f in df["feature"]]
    df["selected"] = df["feature"].isin(sel)
    df = df.sort_values(["selected", "share", "matches"], ascending=[False, False, False])
    types = {"feature": pa.int32(), "name": pa.string(), "layer": pa.int32(), "latent": pa.int32(),
             "contexts": pa.int64(), "matches": pa.int64(), "share": pa.float64(), "selected": pa.bool_(),
             "freq": pa.float64(), "max_act": pa.float64(), "top_tokens": pa.list_(pa.string()),
             "next_tokens": pa.list_(pa.string())}
    return pa.table({c: pa.array([v if not isinstance(v, np.ndarray) else list(v) for v in df[c]], types[c])
                     for c in HESITATION_COLUMNS})


def random_control(latents: pa.Table, exclude: Iterable[int], n: int, seed: int) -> list[int]:
    """`n` live features drawn at random (seeded) outside `exclude`: the ablation control."""
    lat = latents.to_pandas()
    pool = sorted(int(f) for f, live in zip(lat["feature"], lat["live"]) if live and int(f) not in set(exclude))
    if n > len(pool):
        raise TranscoderError(f"cannot draw {n} random control features from {len(pool)} live ones")
    rng = np.random.default_rng([seed, 7])
    return sorted(int(f) for f in rng.choice(pool, size=n, replace=False)) if n else []


def count_words(text: str, words: Sequence[str]) -> int:
    """Occurrences of any of `words` in `text`: whole-word, case-insensitive (the one rule of
    `rank1_core.lexicon`, which `steer` counts with too)."""
    return lexicon.count_words(text, words)


# --------------------------------------------------------------------------- generation


@dataclass
class TranscoderEngineSpec:
    """What one generation actor serves. `variants`: name -> None (the model itself, adapters
    off) or a list of global features to ablate ([] = the adapters as trained)."""

    model_dir: str
    transcoder_dir: Optional[str]
    variants: dict[str, Optional[list[int]]]
    settings: dict = field(default_factory=dict)
    dtype: str = "float32"
    batch_size: int = 16
    threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class TranscoderGenerationWorker:
    """Ray Data actor with the rows and outputs of `rank1_core.generation.GenerationWorker`
    (GENERATED_COLUMNS), generating with transformers on the base model with the adapters
    installed: adapters on, off, or with features ablated, per variant."""

    def __init__(self, spec: dict):
        import tempfile

        from rank1_core.generation import HFGenerator, SamplingSettings, local_dir

        self.spec = TranscoderEngineSpec(**spec)
        self._tmp = tempfile.mkdtemp(prefix="rank1-tcgen-")
        model_dir = local_dir(self.spec.model_dir, self._tmp)
        self.gen = HFGenerator(model_dir, {v: None for v in self.spec.variants}, "peft",
                               SamplingSettings(**self.spec.settings), self.spec.dtype,
                               batch_size=self.spec.batch_size, threads=self.spec.threads)
        self.inst = None
        if self.spec.transcoder_dir is not None:
            fs, path = _fs_path(self.spec.transcoder_dir)
            adapter = TranscoderAdapter.load(path, fs)
            self.inst = adapter.install(self.gen.model)
        elif any(v is not None for v in self.spec.variants.values()):
            raise TranscoderError("variants with adapters need transcoder_dir")

    def _set(self, variant: str) -> None:
        abl = self.spec.variants[variant]
        if self.inst is None:
            return
        self.inst.enabled = abl is not None
        self.inst.ablate(abl or [])

    def __call__(self, batch):
        import pandas as pd

        from rank1_core.generation import GENERATED_COLUMNS

        batch = pd.DataFrame(batch)
        rows = []
        for variant, g in batch.groupby("variant", sort=False):
            self._set(variant)
            outs = self.gen.generate([list(map(int, p)) for p in g["prompt_ids"]], variant)
            for r, samples in zip(g.itertuples(index=False), outs):
                for k, c in enumerate(samples):
                    rows.append({"variant": variant, "benchmark": r.benchmark, "problem_id": r.problem_id,
                                 "sample": k, "response": c.text, "n_tokens": c.n_tokens, "finished": c.finished,
                                 "backend": self.gen.backend, "lora_mode": None, "answer": r.answer,
                                 "kind": r.kind, "n_choices": int(r.n_choices)})
        return pd.DataFrame(rows, columns=GENERATED_COLUMNS)

    def close(self) -> None:
        import shutil

        gen, self.gen = getattr(self, "gen", None), None
        if gen is not None:
            gen.close()
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


def target_model(cfg) -> str:
    """The model directory or URI of `transcoder.target`: the train_full stage's model, or a
    model of the same architecture by name or path."""
    from rank1_core.config import ConfigError, ModelConfig
    from rank1_core.models import ModelNotAvailable, resolve_model_dir
    from rank1_core.rundir import RunDir

    t = cfg.transcoder.target
    if t == "train_full":
        return RunDir(cfg.run.dir).stage("train_full").uri_of("model")
    try:
        return str(resolve_model_dir(ModelConfig(name=t, tiny=cfg.model.tiny)))
    except ModelNotAvailable as e:
        raise ConfigError(f"transcoder.target {t!r}: {e}") from None
