"""`rank1 export sae --format saelens`: the SAE as a SAELens JumpReLU SAE, loaded by the real
`sae-lens` package (its own cached virtualenv, tests/saelens_env.py), which must give the
latents rank1 stored for the same activation rows."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from rank1_core.config import SAEConfig
from rank1_core.export import ExportError
from rank1_core.export.saelens import export_saelens, folded_tensors
from rank1_core.rundir import RunDir, run_stage
from rank1_core.sae import BatchTopKSAE, StageInputs, train_local
from ray_jobs.export import main as export_main
from test_sae_fixtures import write_extract_stage

TOKENS = 1500


def make_sae_run(run_dir: Path) -> np.ndarray:
    """A run with finished `extract` (2 layers x 7 components) and `sae` stages."""
    x = write_extract_stage(run_dir, tokens=TOKENS, layers=2, files=2)
    cfg = SAEConfig(expansion=4, k=4, batch_size=64, epochs=2, lr=1e-2, warmup_steps=5, dead_tokens=TOKENS,
                    threshold_ema=0.05, shuffle_buffer=256, encode_batch_size=512)
    stage = RunDir(str(run_dir)).stage("sae")

    def body(sr):
        inputs = StageInputs.from_extract(None, str(run_dir / "extract"))
        train_local(cfg, inputs, sr.stage.path(), seed=0)

    run_stage(stage, "h", "model:\n  name: tiny-test\n", body, log=lambda m: None)
    return x


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    x = make_sae_run(run)
    return run, x


def _stored_latents(run: Path, d_sae: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Dense [tokens, d_sae] from the sae stage's sparse feature rows, in activation-row order."""
    acts = pq.read_table(run / "extract" / "activations", columns=["doc_id", "pos"])
    keys = list(zip(acts.column("doc_id").to_pylist(), acts.column("pos").to_pylist()))
    row = {k: i for i, k in enumerate(keys)}
    feats = pq.read_table(run / "sae" / "features")
    z = np.zeros((len(keys), d_sae), np.float32)
    idx = [row[k] for k in zip(feats.column("doc_id").to_pylist(), feats.column("pos").to_pylist())]
    z[idx, feats.column("feature").to_numpy()] = feats.column("value").to_numpy()
    return z, keys


def test_folded_weights_reproduce_rank1_encode_and_decode(sae_run, tmp_path):
    run, x = sae_run
    sae = BatchTopKSAE.load(str(run / "sae"))
    assert sae.normalize_mode == "column" and float(sae.threshold) > 0
    t = {k: v.double() for k, v in folded_tensors(sae).items()}
    xt = torch.from_numpy(x).double()
    pre = (xt - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    z = torch.relu(pre) * (pre > t["threshold"])  # SAELens' JumpReLU, written out
    with torch.no_grad():
        ref = sae.encode(torch.from_numpy(x)).double()
        assert torch.allclose(z, ref, atol=1e-4)
        assert torch.equal(z > 0, ref > 0) or (z > 0).ne(ref > 0).sum() <= 2  # float32 ties at the threshold
        assert torch.allclose(z @ t["W_dec"] + t["b_dec"], sae.decode(ref.float()).double(), atol=1e-3)


def test_export_layout_cfg_and_sparsity(sae_run, tmp_path):
    run, _ = sae_run
    out = tmp_path / "saelens"
    res = export_saelens(str(run), out)
    assert res["files"] == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 14 and cfg["d_sae"] == 56
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    md = cfg["metadata"]
    assert md["rank1_components"][:2] == ["L00_q_proj", "L00_k_proj"] and len(md["rank1_components"]) == 14
    assert md["rank1_component_layers"] == [0] * 7 + [1] * 7 and md["model_name"] == "tiny-test"
    w = load_file(str(out / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (14, 56), "b_enc": (56,), "W_dec": (56, 14), "b_dec": (14,), "threshold": (56,)}
    assert torch.all(w["threshold"] == md["rank1_threshold"])
    lat = pq.read_table(run / "sae" / "latents.parquet").sort_by("feature")
    sp = load_file(str(out / "sparsity.safetensors"))["sparsity"].double().numpy()
    np.testing.assert_allclose(10 ** sp - 1e-10, lat.column("freq").to_numpy(), rtol=1e-5, atol=1e-9)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_saelens_package_encodes_stored_rows_to_rank1_latents(sae_run, tmp_path):
    from saelens_env import saelens_python

    python = saelens_python()
    run, x = sae_run
    out = tmp_path / "saelens"
    export_saelens(str(run), out)
    script = textwrap.dedent("""
        import sys, numpy as np, pyarrow.parquet as pq, torch
        from sae_lens import SAE, JumpReLUSAE
        sae = SAE.load_from_disk(sys.argv[1], device="cpu")
        assert isinstance(sae, JumpReLUSAE), type(sae)
        cols = sae.cfg.metadata.rank1_components
        tab = pq.read_table(sys.argv[2], columns=cols)
        x = torch.from_numpy(np.stack([tab.column(c).to_numpy() for c in cols], 1).astype(np.float32))
        with torch.no_grad():
            z = sae.encode(x)
            rec = sae.decode(z)
        np.save(sys.argv[3], z.numpy()); np.save(sys.argv[4], rec.numpy())
    """)
    r = subprocess.run([python, "-c", script, str(out), str(run / "extract" / "activations"),
                        str(tmp_path / "z.npy"), str(tmp_path / "rec.npy")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    z_lens = np.load(tmp_path / "z.npy")
    sae = BatchTopKSAE.load(str(run / "sae"))
    stored, _ = _stored_latents(run, sae.d_sae)
    live = np.asarray(pq.read_table(run / "sae" / "latents.parquet").sort_by("feature").column("live").to_pylist())
    assert stored.any() and live.any()
    # the sae stage stores only live latents; on those, SAELens gives the stored values
    on_lens, on_rank1 = z_lens[:, live] > 0, stored[:, live] > 0
    assert (on_lens != on_rank1).sum() <= 2  # float32 ties at the threshold, if any
    np.testing.assert_allclose(z_lens[:, live], stored[:, live], atol=1e-4)
    # and on every latent, rank1's own encode; reconstructions agree too
    with torch.no_grad():
        z_rank1 = sae.encode(torch.from_numpy(x)).numpy()
        rec_rank1 = sae.decode(torch.from_numpy(z_rank1)).numpy()
    np.testing.assert_allclose(z_lens, z_rank1, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "rec.npy"), rec_rank1, atol=1e-3)


def test_bad_input_names_what_is_missing(tmp_path, capsys):
    # no sae stage
    write_extract_stage(tmp_path / "run", tokens=200, layers=1, files=1)
    with pytest.raises(ExportError, match=r"'sae' stage .* has not finished .*rank1 sae"):
        export_saelens(str(tmp_path / "run"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export_main(["sae", "--run", str(tmp_path / "run"), "--format", "saelens", str(tmp_path / "out")]) == 2
    assert "'sae' stage" in capsys.readouterr().err
    # no run directory at all: an error, and no empty folder made
    assert export_main(["sae", "--run", str(tmp_path / "nope"), str(tmp_path / "o4")]) == 2
    assert "run directory" in capsys.readouterr().err and not (tmp_path / "nope").exists()
    # unknown format
    assert export_main(["sae", "--run", str(tmp_path / "run"), "--format", "dictionary", str(tmp_path / "o2")]) == 2
    assert "saelens" in capsys.readouterr().err
    # unknown kind of export
    assert export_main(["weights", "--run", str(tmp_path / "run"), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "weights" in err and "neuronpedia" in err


def test_existing_output_is_kept_unless_forced(sae_run, tmp_path):
    run, _ = sae_run
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="already exists"):
        export_saelens(str(run), out)
    assert (out / "mine.txt").read_text() == "keep"
    assert export_main(["sae", "--run", str(run), "--format", "saelens", "--force", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
