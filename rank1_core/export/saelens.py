"""The cross-layer BatchTopK SAE of the `sae` stage as a SAELens JumpReLU SAE.

SAELens (v6) loads a folder of ``cfg.json`` + ``sae_weights.safetensors`` (+ the optional
``sparsity.safetensors``) with ``SAE.load_from_disk(folder)``. Its JumpReLU SAE encodes

    hidden_pre = (x - b_dec) @ W_enc + b_enc          # apply_b_dec_to_input: true
    z          = relu(hidden_pre) * (hidden_pre > threshold)
    x_hat      = z @ W_dec + b_dec

and SAELens itself saves a trained BatchTopK SAE this way for inference, its one global
threshold (a running average of the smallest activation BatchTopK kept) copied into every
latent's ``threshold``. rank1's SAE is the same model behind an affine input normalisation
``x_n = (x - shift) / scale`` (`rank1_core.sae`), which is folded into the weights here, so
the export reads raw adapter activations (``normalize_activations: none``):

    W_enc' = W_enc / scale[:, None]      b_enc' = b_enc
    W_dec' = W_dec * scale[None, :]      b_dec' = b_dec * scale + shift
    threshold' = [threshold] * d_sae

Then (x - b_dec') @ W_enc' = ((x - shift) / scale - b_dec) @ W_enc, exactly rank1's
pre-activation, and z @ W_dec' + b_dec' = (z @ W_dec + b_dec) * scale + shift, its
reconstruction. The decoder rows are no longer unit-norm (the scale lives in them);
SAELens' ``fold_W_dec_norm`` can move it into the encoder if a tool wants unit rows.

``d_in`` is the number of adapter components (layers x 7 for a model with 7 adapted modules
per layer), in the extract stage's catalogue order; ``metadata.rank1_components`` names them.
``sparsity.safetensors`` holds ``sparsity`` = log10(firing rate + 1e-10) per latent, as
SAELens' trainer writes it, from the firing counts the sae stage measured over every token.

Transcoders: SAELens' transcoder classes are ``Transcoder`` (ReLU), ``SkipTranscoder`` and
``JumpReLUTranscoder`` (per-latent thresholds). rank1's transcoder adapters keep exactly the k
largest latents of every token (per-token TopK, no threshold), which none of them computes,
so they are not exported in this format (``TRANSCODER_UNSUPPORTED`` says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from rank1_core import __version__
from rank1_core.export.atomic import ExportError, check_destination
from rank1_core.rundir import RunDir, StageDir, StageNotDone, atomic_dir, resolve_filesystem
from rank1_core.sae import BatchTopKSAE

SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config generation the files follow (cfg.json with a ``metadata`` block)."""
SPARSITY_EPS = 1e-10
TRANSCODER_UNSUPPORTED = (
    "rank1's transcoder adapters keep the k largest latents of each token (per-token TopK); "
    "SAELens' transcoder classes (Transcoder: ReLU, JumpReLUTranscoder: per-latent thresholds) "
    "cannot compute that, so a SAELens transcoder export would not give the same latents")


def open_run(uri: str) -> RunDir:
    """The run directory at ``uri``; an `ExportError` (never a new empty folder) when it does not exist."""
    import pyarrow.fs as pafs

    fs, root = resolve_filesystem(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ExportError(f"run directory {uri} does not exist")
    return RunDir(uri)


def require_stage(run: RunDir, name: str, what: str) -> StageDir:
    """The finished stage ``name`` of ``run``, or an `ExportError` naming what is missing."""
    st = run.stage(name)
    try:
        st.require_done()
    except StageNotDone:
        raise ExportError(f"{what} needs the '{name}' stage of run {run.uri}, which has not finished "
                          f"(no _SUCCESS in {st.uri}); run `rank1 {name} --run {run.uri}` first") from None
    return st


def run_config(stage: StageDir) -> dict:
    """The resolved config a stage recorded (its ``config.yaml``), or {} when unreadable."""
    import yaml

    try:
        return yaml.safe_load(stage.read_text("config.yaml")) or {}
    except (OSError, FileNotFoundError, yaml.YAMLError):
        return {}


def folded_tensors(sae: BatchTopKSAE) -> dict[str, torch.Tensor]:
    """SAELens JumpReLU state dict (W_enc, b_enc, W_dec, b_dec, threshold) with rank1's input
    normalisation folded in (see the module docstring)."""
    with torch.no_grad():
        scale = sae.norm_scale.detach().double().cpu()
        shift = sae.norm_shift.detach().double().cpu()
        W_enc = sae.W_enc.detach().double().cpu() / scale[:, None]
        W_dec = sae.W_dec.detach().double().cpu() * scale[None, :]
        b_dec = sae.b_dec.detach().double().cpu() * scale + shift
        b_enc = sae.b_enc.detach().double().cpu()
        thr = torch.full((sae.d_sae,), float(sae.threshold), dtype=torch.float64)
    return {k: v.float().contiguous() for k, v in
            {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr}.items()}


def saelens_cfg(sae: BatchTopKSAE, catalogue: list[dict], latents: dict[str, np.ndarray], cfg: dict,
                summary: dict) -> dict[str, Any]:
    """cfg.json: SAELens' JumpReLU fields plus metadata naming rank1's inputs in order."""
    model = (cfg.get("model") or {}).get("name")
    live = latents["live"]
    return {
        "architecture": "jumprelu",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": model,
            "hook_name": "rank1_adapter_state",
            "hook_head_index": None,
            "prepend_bos": False,
            "exported_by": f"rank1 {__version__}",
            "rank1_input": ("per-token rank-1 LoRA scalars lora_A . x of every adapted module, one per "
                            "component, in rank1_components order (not a TransformerLens hook)"),
            "rank1_components": [c["column"] for c in catalogue],
            "rank1_component_layers": [int(c["layer"]) for c in catalogue],
            "rank1_component_modules": [c["module"] for c in catalogue],
            "rank1_component_kinds": [c["kind"] for c in catalogue],
            "rank1_architecture": "batchtopk (saved for inference as jumprelu with its global threshold)",
            "rank1_k": sae.k,
            "rank1_threshold": float(sae.threshold),
            "rank1_normalization": f"{sae.normalize_mode} (folded into W_enc, W_dec and b_dec)",
            "rank1_feature_names": "F%05d by latent index",
            "rank1_live_latents": int(live.sum()),
            "rank1_dead_latents": [int(i) for i in np.flatnonzero(~live)],
            "rank1_tokens_measured": int(summary.get("tokens", 0)),
        },
    }


def _latents(stage: StageDir, d_sae: int) -> dict[str, np.ndarray]:
    if not stage.exists("latents.parquet"):
        raise ExportError(f"{stage.uri_of('latents.parquet')} is missing: the sae stage writes it; rerun it")
    tab = pq.read_table(stage.path("latents.parquet"), filesystem=stage.fs).sort_by("feature")
    for c in ("feature", "live", "freq"):
        if c not in tab.column_names:
            raise ExportError(f"{stage.uri_of('latents.parquet')} lacks column {c!r}")
    if tab.num_rows != d_sae:
        raise ExportError(f"{stage.uri_of('latents.parquet')} has {tab.num_rows} rows for an SAE of {d_sae} latents")
    return {"live": np.asarray(tab.column("live").to_pylist(), dtype=bool),
            "freq": tab.column("freq").to_numpy().astype(np.float64)}


def export_saelens(run_uri: str, out: str | Path, force: bool = False) -> dict:
    """Write the run's SAE in SAELens' layout into ``out`` (a local folder, created whole or
    not at all). Returns a summary (folder, d_in, d_sae, files)."""
    run = open_run(run_uri)
    st = require_stage(run, "sae", "a SAELens export")
    ext = require_stage(run, "extract", "a SAELens export (its component catalogue)")
    if not st.exists("cfg.json") or not st.exists("sae.safetensors"):
        raise ExportError(f"{st.uri} lacks cfg.json or sae.safetensors although the stage is marked done; "
                          "rerun `rank1 sae --force`")
    sae = BatchTopKSAE.load(st.path(), st.fs)
    cat = pq.read_table(ext.path("components.parquet"), filesystem=ext.fs).sort_by("component_id").to_pylist()
    if [c["column"] for c in cat] != sae.columns:
        raise ExportError(f"{st.uri_of('cfg.json')} lists columns {sae.columns[:3]}... that differ from the extract "
                          f"stage's catalogue {[c['column'] for c in cat][:3]}...: the sae stage is stale; rerun it")
    lat = _latents(st, sae.d_sae)
    summary = st.read_json("summary.json") if st.exists("summary.json") else {}
    cfg = saelens_cfg(sae, cat, lat, run_config(st), summary)
    with atomic_dir(check_destination(out, force)) as tmp:
        save_file(folded_tensors(sae), str(tmp / "sae_weights.safetensors"))
        sparsity = torch.from_numpy(np.log10(lat["freq"] + SPARSITY_EPS).astype(np.float32))
        save_file({"sparsity": sparsity}, str(tmp / "sparsity.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    out = Path(out).expanduser().resolve()
    return {"out": str(out), "format": "saelens", "architecture": "jumprelu", "d_in": sae.d_in,
            "d_sae": sae.d_sae, "files": sorted(p.name for p in out.iterdir())}
