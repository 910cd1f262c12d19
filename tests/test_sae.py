"""The SAE library (fast tier, no Ray): hand-worked values, a naive reference, the data contract."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from rank1_core.config import ConfigError, SAEConfig, config_from_dict
from rank1_core.sae import (
    BatchTopKSAE,
    Normalization,
    SAEInputError,
    SAETrainer,
    StageInputs,
    batch_topk,
    fit_normalization,
    iter_activation_batches,
    lr_factor,
    plan_steps,
    run_training,
    train_local,
)
from test_sae_fixtures import component_columns, synthetic_activations, write_extract_stage


def build_cfg(**overrides) -> SAEConfig:
    base = dict(expansion=4, k=4, batch_size=64, lr=3e-3, warmup_steps=5, decay_frac=0.2,
                dead_tokens=640, shuffle_buffer=0, norm_tokens=100_000, encode_batch_size=128)
    base.update(overrides)
    return SAEConfig(**base)


def set_weights(sae: BatchTopKSAE, **tensors) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=torch.float32))


def hand_sae(threshold: float = 0.0) -> BatchTopKSAE:
    sae = BatchTopKSAE(2, 2, 1, ["a", "b"], normalize="none")
    set_weights(sae, W_enc=[[1, 2], [0, 1]], b_enc=[0, -0.5], W_dec=[[0.6, 0.8], [1, 0]],
                b_dec=[0.5, 0.5], threshold=threshold)
    return sae


# --------------------------------------------------------------------------- hand-worked values


def test_encode_decode_by_hand():
    sae = hand_sae()
    x = torch.tensor([[1.5, 2.0]])
    # (x - b_dec) = [1, 1.5]; @ W_enc = [1, 3.5]; + b_enc = [1, 3]; relu -> [1, 3]
    assert sae.encode(x).tolist() == [[1.0, 3.0]]
    # [1, 3] @ W_dec = [0.6 + 3, 0.8]; + b_dec = [4.1, 1.3]
    assert torch.allclose(sae(x), torch.tensor([[4.1, 1.3]]))


def test_threshold_gates_inference_by_hand():
    sae = hand_sae(threshold=2.0)
    x = torch.tensor([[1.5, 2.0]])
    assert sae.encode(x).tolist() == [[0.0, 3.0]]  # 1 <= 2 is cut, 3 > 2 kept
    assert torch.allclose(sae(x), torch.tensor([[3.5, 0.5]]))


def test_normalization_applied_on_encode_and_decode():
    sae = hand_sae()
    set_weights(sae, norm_shift=[1.0, 0.0], norm_scale=[2.0, 1.0])
    x = torch.tensor([[4.0, 2.0]])  # normalised: [1.5, 2.0], as above
    assert sae.encode(x).tolist() == [[1.0, 3.0]]
    assert torch.allclose(sae(x), torch.tensor([[4.1 * 2 + 1, 1.3]]))


def test_batch_topk_selection_by_hand():
    pre = torch.tensor([[3.0, 1.0, 0.0], [2.0, 5.0, 4.0]])
    # k=2, B=2: keep the 4 largest of the batch: 5, 4, 3, 2 (row 0 keeps 1, row 1 keeps 3)
    assert batch_topk(pre, 2).tolist() == [[3.0, 0.0, 0.0], [2.0, 5.0, 4.0]]
    assert batch_topk(pre, 1).tolist() == [[0.0, 0.0, 0.0], [0.0, 5.0, 4.0]]
    assert batch_topk(pre, 3).tolist() == pre.tolist()


def _sorted_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals = pre.tolist()
    order = sorted(((v, i, j) for i, r in enumerate(vals) for j, v in enumerate(r)), key=lambda t: -t[0])
    out = torch.zeros_like(pre)
    for v, i, j in order[: k * len(vals)]:
        out[i, j] = v
    return out


@pytest.mark.parametrize("shape,k,skew", [((4, 40), 2, True), ((16, 200), 3, False), ((32, 64), 4, True), ((8, 12), 5, False)])
def test_batch_topk_fast_path_and_fallback_match_a_sort(shape, k, skew):
    g = torch.Generator().manual_seed(sum(shape) + k)
    pre = torch.relu(torch.randn(shape, generator=g))
    if skew:  # row 0 dominates: it holds every kept value, more than its 4k candidates
        pre[0] += 10.0
    assert torch.equal(batch_topk(pre, k), _sorted_topk(pre, k))


def test_threshold_running_estimate_by_hand():
    sae = hand_sae()
    sae.update_threshold(0.8, 0.1)
    assert float(sae.threshold) == pytest.approx(0.8)  # first estimate taken as is
    sae.update_threshold(0.6, 0.1)
    assert float(sae.threshold) == pytest.approx(0.78)  # 0.9 * 0.8 + 0.1 * 0.6
    sae.update_threshold(float("inf"), 0.1)  # a batch with nothing active changes nothing
    assert float(sae.threshold) == pytest.approx(0.78)


def test_decoder_gradient_projection_and_renorm_by_hand():
    sae = hand_sae()
    sae.W_dec.grad = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    sae.remove_parallel_grads()
    # row 0: g - (g.w) w = [1, 0] - 0.6 * [0.6, 0.8] = [0.64, -0.48]; row 1: [0.5, 2] - 0.5 * [1, 0]
    assert torch.allclose(sae.W_dec.grad, torch.tensor([[0.64, -0.48], [0.0, 2.0]]))
    set_weights(sae, W_dec=[[3.0, 4.0], [0.0, -2.0]])
    sae.renorm_decoder()
    assert torch.allclose(sae.W_dec, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_lr_schedule():
    assert [round(lr_factor(s, 10, 2, 0.2), 3) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 1.0, 0.5]


def test_decoder_rows_stay_unit_norm_while_training():
    x = torch.from_numpy(synthetic_activations(256, 14))
    sae = BatchTopKSAE(14, 56, 4, component_columns(2), seed=1)
    sae.set_normalization(fit_normalization([{"x": x}], "column", 14))
    tr = SAETrainer(sae, build_cfg(lr=1e-2), total_steps=20)
    for i in range(20):
        tr.train_step(x[(i % 4) * 64:(i % 4 + 1) * 64])
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(56), atol=1e-6)


# --------------------------------------------------------------------------- config and bad input


@pytest.mark.parametrize("section,msg", [
    ({"expansion": 0}, "sae.expansion must be >= 1, got 0"),
    ({"k": 0}, "sae.k must be >= 1"),
    ({"batch_size": 100, "num_workers": 3}, "sae.batch_size (100) must be divisible by sae.num_workers (3)"),
    ({"lr": 0}, "sae.lr must be > 0"),
    ({"threshold_ema": 1.5}, "sae.threshold_ema must be in (0, 1]"),
    ({"normalize": "l2"}, "'sae.normalize' must be one of"),
    ({"aux_k": 0}, "sae.aux_k must be >= 1 or null"),
])
def test_bad_config_values(section, msg):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"sae": section})
    assert msg in str(e.value)


def test_k_larger_than_latents_rejected():
    with pytest.raises(ValueError, match=r"sae.k \(20\) must be between 1 and the number of latents \(16"):
        BatchTopKSAE.from_config(SAEConfig(expansion=8, k=20), ["a", "b"])


def test_batch_larger_than_data_rejected():
    with pytest.raises(SAEInputError, match="sae.batch_size .4096. exceeds the 1000 tokens"):
        plan_steps(SAEConfig(), 1000)


def test_missing_and_extra_columns_rejected(tmp_path):
    def drop(i, t):
        return t.drop_columns(["L01_up_proj"]) if i == 1 else t

    write_extract_stage(tmp_path / "a", tokens=200, table_edit=drop)
    with pytest.raises(SAEInputError, match=r"part-00001.parquet: missing 1 component column.*L01_up_proj"):
        StageInputs.from_extract(None, str(tmp_path / "a" / "extract"))

    def extra(i, t):
        return t.append_column("L02_q_proj", pa.array(np.zeros(t.num_rows, np.float32)))

    write_extract_stage(tmp_path / "b", tokens=200, table_edit=extra)
    with pytest.raises(SAEInputError, match=r"part-00000.parquet: 1 float column\(s\) not in the component catalogue.*L02_q_proj"):
        StageInputs.from_extract(None, str(tmp_path / "b" / "extract"))


def test_nan_rejected_naming_file_token_and_column(tmp_path):
    def poison(i, t):
        if i != 1:
            return t
        col = t.column("L00_v_proj").to_numpy().copy()
        col[7] = np.nan
        return t.set_column(t.schema.get_field_index("L00_v_proj"), "L00_v_proj", pa.array(col, pa.float32()))

    write_extract_stage(tmp_path, tokens=200, table_edit=poison)
    inputs = StageInputs.from_extract(None, str(tmp_path / "extract"))
    with pytest.raises(SAEInputError) as e:
        list(inputs.batches(32))
    msg = str(e.value)
    assert "part-00001.parquet" in msg and "'L00_v_proj'" in msg and "pos 7" in msg and "nan" in msg


def test_wrong_width_rejected():
    sae = BatchTopKSAE(14, 28, 2, component_columns(2))
    with pytest.raises(SAEInputError, match=r"shape \(3, 13\); expected \[tokens, 14\]"):
        sae.encode(torch.zeros(3, 13))


# --------------------------------------------------------------------------- streaming


def test_streaming_covers_every_token_once_and_is_seeded(tmp_path):
    x = write_extract_stage(tmp_path, tokens=1000, files=3)
    inputs = StageInputs.from_extract(None, str(tmp_path / "extract"))
    assert inputs.tokens == 1000 and inputs.columns == component_columns(2)

    def keys(bs):
        return [tuple(zip(b["doc_id"].tolist(), b["pos"].tolist())) for b in bs]

    a = list(inputs.batches(64, shuffle_buffer=300, seed=1, read_rows=100))
    b = list(inputs.batches(64, shuffle_buffer=300, seed=1, read_rows=100))
    c = list(inputs.batches(64, shuffle_buffer=300, seed=2, read_rows=100))
    assert keys(a) == keys(b) and keys(a) != keys(c)
    assert [len(t["x"]) for t in a] == [64] * 15 + [40]
    flat = [k for ks in keys(a) for k in ks]
    assert len(set(flat)) == 1000
    # rows stay intact: the shuffled rows are the file rows
    got = torch.cat([t["x"] for t in a]).numpy()
    plain = torch.cat([t["x"] for t in inputs.batches(1000)]).numpy()
    assert np.allclose(np.sort(got, axis=0), np.sort(plain, axis=0)) and np.allclose(plain, x)
    assert [len(t["x"]) for t in inputs.batches(64, shuffle_buffer=300, drop_last=True)] == [64] * 15


def test_column_normalization_fits_mean_and_std():
    x = torch.from_numpy(synthetic_activations(500, 14))
    norm = fit_normalization([{"x": x[:200]}, {"x": x[200:]}], "column", 14)
    assert np.allclose(norm.shift, x.double().mean(0).numpy(), atol=1e-6)
    assert np.allclose(norm.scale, x.double().std(0, unbiased=False).numpy(), rtol=1e-6)
    xn = (x.double().numpy() - norm.shift) / norm.scale
    assert np.allclose((xn ** 2).sum(1).mean(), 14)
    sc = fit_normalization([{"x": x}], "scalar", 14)
    assert np.allclose(((x.double().numpy() / sc.scale) ** 2).sum(1).mean(), 14)


# --------------------------------------------------------------------------- the naive reference


class NaiveBatchTopK:
    """An independent, deliberately plain BatchTopK SAE trainer: python loops for the
    selections, the projection, the renormalisation, the dead-latent counters and Adam."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, shift, scale, *, k, lr, warmup, decay_frac, total,
                 aux_k, aux_coef, dead_tokens, ema):
        self.p = {n: torch.tensor(v, dtype=torch.float32).clone().requires_grad_(True)
                  for n, v in dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec).items()}
        self.m = {n: torch.zeros_like(v) for n, v in self.p.items()}
        self.v = {n: torch.zeros_like(v) for n, v in self.p.items()}
        self.shift, self.scale = torch.tensor(shift), torch.tensor(scale)
        self.k, self.lr, self.warmup, self.decay_frac, self.total = k, lr, warmup, decay_frac, total
        self.aux_k, self.aux_coef, self.dead_tokens, self.ema = aux_k, aux_coef, dead_tokens, ema
        self.t = 0
        self.last_fired = [0] * len(b_enc)  # tokens seen since each latent last fired
        self.threshold = 0.0

    def pre(self, xn):
        p = self.p
        return torch.relu((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"])

    def step(self, x):
        p = self.p
        xn = (x - self.shift) / self.scale
        pre = self.pre(xn)
        B, S = pre.shape
        vals = pre.detach().tolist()
        order = sorted(((vals[i][j], i, j) for i in range(B) for j in range(S)), key=lambda t: -t[0])
        mask = torch.zeros(B, S)
        for _, i, j in order[: self.k * B]:
            mask[i, j] = 1.0
        acts = pre * mask
        recon = acts @ p["W_dec"] + p["b_dec"]
        mse = ((recon - xn) ** 2).mean()
        dead = [j for j in range(S) if self.last_fired[j] >= self.dead_tokens]
        aux = torch.tensor(0.0)
        if dead and self.aux_coef > 0:
            resid = (xn - recon).detach()
            amask = torch.zeros(B, S)
            for i in range(B):
                row = sorted(dead, key=lambda j: -vals[i][j])[: min(self.aux_k, len(dead))]
                for j in row:
                    amask[i, j] = 1.0
            e_hat = (pre * amask) @ p["W_dec"]
            aux = ((e_hat - resid) ** 2).sum() / (resid ** 2).sum()
        loss = mse + self.aux_coef * aux
        for t in p.values():
            t.grad = None
        loss.backward()
        with torch.no_grad():
            g = p["W_dec"].grad
            for j in range(S):
                w = p["W_dec"][j]
                g[j] -= torch.dot(g[j], w) * w
            f = min(1.0, (self.t + 1) / self.warmup)
            nd = int(self.total * self.decay_frac)
            if nd and self.t >= self.total - nd:
                f *= (self.total - self.t) / nd
            lr = self.lr * f
            self.t += 1
            for n, t in p.items():
                self.m[n] = 0.9 * self.m[n] + 0.1 * t.grad
                self.v[n] = 0.999 * self.v[n] + 0.001 * t.grad ** 2
                mhat = self.m[n] / (1 - 0.9 ** self.t)
                vhat = self.v[n] / (1 - 0.999 ** self.t)
                t -= lr * mhat / (vhat.sqrt() + 1e-8)
            for j in range(S):
                p["W_dec"][j] /= p["W_dec"][j].norm()
            a = acts.detach()
            positives = [v for row in a.tolist() for v in row if v > 0]
            for j in range(S):
                fired = any(a[i, j] > 0 for i in range(B))
                self.last_fired[j] = 0 if fired else self.last_fired[j] + B
            if positives:
                mn = min(positives)
                self.threshold = mn if self.threshold <= 0 else (1 - self.ema) * self.threshold + self.ema * mn
        return {"loss": loss.item(), "mse": mse.item(), "aux_loss": aux.item()}

    def reconstruct(self, x):
        with torch.no_grad():
            xn = (x - self.shift) / self.scale
            pre = self.pre(xn)
            z = pre * (pre > self.threshold)
            return (z @ self.p["W_dec"] + self.p["b_dec"]) * self.scale + self.shift


def _pair(cfg: SAEConfig, x: torch.Tensor, total: int, seed: int = 3):
    cols = component_columns(x.shape[1] // 7)
    sae = BatchTopKSAE.from_config(cfg, cols, seed=seed)
    norm = fit_normalization([{"x": x}], cfg.normalize, x.shape[1])
    sae.set_normalization(norm)
    ours = SAETrainer(sae, cfg, total)
    sd = {k: v.clone().tolist() for k, v in sae.state_dict().items()}
    ref = NaiveBatchTopK(sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"], sd["norm_shift"], sd["norm_scale"],
                         k=cfg.k, lr=cfg.lr, warmup=cfg.warmup_steps, decay_frac=cfg.decay_frac, total=total,
                         aux_k=ours.aux_k, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens, ema=cfg.threshold_ema)
    return ours, ref


def test_one_step_matches_naive_reference_exactly():
    x = torch.from_numpy(synthetic_activations(64, 14, seed=5))
    cfg = build_cfg(dead_tokens=64)
    ours, ref = _pair(cfg, x, total=10)
    # make a third of the latents dead on both sides so AuxK is exercised
    dead = list(range(0, 56, 3))
    ours.since_fired[dead] = 64
    for j in dead:
        ref.last_fired[j] = 64
    m = ours.train_step(x)
    r = ref.step(x)
    assert r["aux_loss"] > 0
    for key in ("loss", "mse", "aux_loss"):
        assert m[key] == pytest.approx(r[key], rel=1e-5), key
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(ours.sae, name), ref.p[name], atol=1e-6), name
    assert float(ours.sae.threshold) == pytest.approx(ref.threshold, rel=1e-6)
    assert ours.since_fired.tolist() == ref.last_fired


def test_training_matches_naive_reference():
    x = torch.from_numpy(synthetic_activations(1024, 14, seed=7))
    cfg = build_cfg(dead_tokens=256)
    total = 96
    ours, ref = _pair(cfg, x, total)
    ol, rl = [], []
    for s in range(total):
        b = x[(s % 16) * 64:(s % 16 + 1) * 64]
        ol.append(ours.train_step(b)["loss"])
        rl.append(ref.step(b)["loss"])
    assert np.mean(ol[-16:]) < 0.5 * np.mean(ol[:8])  # it learned
    assert np.mean(ol[-16:]) == pytest.approx(np.mean(rl[-16:]), rel=0.03)

    def fvu(rec):
        return float(((rec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    with torch.no_grad():
        f_ours, f_ref = fvu(ours.sae(x)), fvu(ref.reconstruct(x))
    assert f_ours < 0.5
    assert f_ours == pytest.approx(f_ref, rel=0.05, abs=0.01)


# --------------------------------------------------------------------------- trainer behaviour


def test_dead_latent_accounting_and_aux_loss():
    x = torch.from_numpy(synthetic_activations(64, 14, seed=2))
    sae = BatchTopKSAE(14, 28, 2, component_columns(2), seed=0)
    sae.set_normalization(fit_normalization([{"x": x}], "column", 14))
    with torch.no_grad():
        sae.b_enc[5] = -1e4  # latent 5 can never fire
    cfg = build_cfg(k=2, batch_size=16, dead_tokens=40, lr=1e-4)
    tr = SAETrainer(sae, cfg, total_steps=4)
    m1 = tr.train_step(x[:16])
    m2 = tr.train_step(x[16:32])
    assert int(tr.since_fired[5]) == 32 and not bool(tr.dead_mask()[5])
    m3 = tr.train_step(x[32:48])  # 48 >= 40 tokens without firing: dead from now on
    assert bool(tr.dead_mask()[5]) and m3["dead_fraction"] == pytest.approx(float(tr.dead_mask().float().mean()))
    assert m1["dead_fraction"] == 0.0 and m2["aux_loss"] == 0.0
    # AuxK by hand: when the only dead latent has no positive pre-activation, AuxK
    # reconstructs nothing and the normalised residual error is exactly 1
    tr.since_fired.zero_()
    tr.since_fired[5] = 100
    m4 = tr.train_step(x[48:64])
    assert m4["aux_loss"] == pytest.approx(1.0)
    assert m4["loss"] == pytest.approx(m4["mse"] + cfg.aux_coef * 1.0, rel=1e-6)
    assert m4["dead_fraction"] == pytest.approx(1 / 28)  # latent 5 is still dead, nothing else


def test_inference_is_batch_independent(tmp_path):
    x = torch.from_numpy(synthetic_activations(512, 14, seed=4))
    sae = BatchTopKSAE(14, 56, 4, component_columns(2), seed=0)
    sae.set_normalization(fit_normalization([{"x": x}], "column", 14))
    tr = SAETrainer(sae, build_cfg(), total_steps=40)
    for s in range(40):
        tr.train_step(x[(s % 8) * 64:(s % 8 + 1) * 64])
    assert float(sae.threshold) > 0
    with torch.no_grad():
        whole = sae.encode(x)
        singles = torch.cat([sae.encode(x[i:i + 1]) for i in range(0, 512, 37)])
        shuffled = sae.encode(x.flip(0)).flip(0)
    # same latents on, same values up to float rounding of differently sized matmuls
    assert torch.equal(whole[::37] > 0, singles > 0) and torch.allclose(whole[::37], singles, atol=1e-5)
    assert torch.equal(whole > 0, shuffled > 0) and torch.allclose(whole, shuffled, atol=1e-5)
    # average L0 at inference is close to k (the threshold was fitted to BatchTopK)
    assert 2 <= (whole > 0).sum(1).float().mean() <= 8


def test_save_load_round_trip(tmp_path):
    x = torch.from_numpy(synthetic_activations(128, 14, seed=6))
    sae = BatchTopKSAE(14, 56, 4, component_columns(2), normalize="scalar", seed=2)
    sae.set_normalization(fit_normalization([{"x": x}], "scalar", 14))
    tr = SAETrainer(sae, build_cfg(), total_steps=5)
    for _ in range(5):
        tr.train_step(x[:64])
    sae.save(str(tmp_path / "s"), extra={"note": "x"})
    back = BatchTopKSAE.load(str(tmp_path / "s"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["columns"] == component_columns(2) and cfg["normalize"] == "scalar" and cfg["note"] == "x"
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert float(back.threshold) == float(sae.threshold) > 0
    # a weights file that does not match its cfg.json is refused
    cfg["d_sae"] = 60
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match cfg.json"):
        BatchTopKSAE.load(str(tmp_path / "s"))


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    from rank1_core.harness import load_checkpoint, save_checkpoint

    write_extract_stage(tmp_path, tokens=800, files=2)
    inputs = StageInputs.from_extract(None, str(tmp_path / "extract"))
    cfg = build_cfg(shuffle_buffer=200, epochs=3)
    spe, total = plan_steps(cfg, inputs.tokens)
    assert (spe, total) == (12, 36)
    norm = inputs.fit_normalization(cfg)

    def make(seed):
        sae = BatchTopKSAE.from_config(cfg, inputs.columns, seed=seed)
        sae.set_normalization(norm)
        return SAETrainer(sae, cfg, total)

    def batches(ep):
        return inputs.batches(cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, seed=ep, drop_last=True)

    full = make(0)
    full_state = run_training(full, batches, spe)

    class Crash(Exception):
        pass

    def crash_at_17(m, state, ckpt):
        if state.step == 17:
            save_checkpoint(part, state, tmp_path)
            raise Crash

    part = make(0)
    with pytest.raises(Crash):
        run_training(part, batches, spe, report=crash_at_17)
    resumed = make(99)  # different init: everything must come from the checkpoint
    state = load_checkpoint(resumed, tmp_path)
    assert resumed.steps == state.step == 17
    state = run_training(resumed, batches, spe, state)
    assert resumed.steps == full.steps == state.step == full_state.step == 36
    for name, t in full.sae.state_dict().items():
        assert torch.equal(t, resumed.sae.state_dict()[name]), name
    assert [m["loss"] for m in state.history] == [m["loss"] for m in full_state.history]


# --------------------------------------------------------------------------- the whole stage without Ray


def test_train_local_outputs(tmp_path):
    x = write_extract_stage(tmp_path, tokens=3000, files=2)
    inputs = StageInputs.from_extract(None, str(tmp_path / "extract"))
    cfg = build_cfg(epochs=4, shuffle_buffer=256, dead_tokens=3000, lr=1e-2, threshold_ema=0.05)
    out = tmp_path / "sae"
    summary = train_local(cfg, inputs, str(out), seed=0)

    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics.num_rows == summary["train_steps"] == 4 * (3000 // 64)
    assert set(metrics.column_names) >= {"loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr"}
    assert metrics.column("l0").to_pylist()[-1] == pytest.approx(4, abs=0.01)

    lat = pq.read_table(out / "latents.parquet")
    assert lat.num_rows == 56 and lat.column("name").to_pylist()[:2] == ["F00000", "F00001"]
    live = set(pc.filter(lat.column("feature"), lat.column("live")).to_pylist())
    assert summary["live_features"] == len(live) > 0
    assert summary["dead_fraction"] == pytest.approx(1 - len(live) / 56)
    assert {"dec_norm_attn", "dec_norm_mlp"} <= set(lat.column_names)

    feats = pq.read_table(out / "features")
    assert feats.schema.names == ["doc_id", "pos", "feature", "value"]
    assert feats.schema.field("feature").type == pa.int32() and feats.schema.field("value").type == pa.float32()
    assert set(feats.column("feature").to_pylist()) == live  # only live features, every live one
    assert feats.num_rows == summary["feature_rows"]
    counts = pc.value_counts(feats.column("feature")).to_pylist()
    cnt = dict(zip(lat.column("feature").to_pylist(), lat.column("count").to_pylist()))
    assert all(cnt[c["values"]] == c["counts"] for c in counts)

    # the sparse rows decode back to the reported reconstruction quality
    sae = BatchTopKSAE.load(str(out))
    z = torch.zeros(3000, 56)
    key = {(d, p): i for i, (d, p) in enumerate(zip(*[t.to_pylist() for t in pq.read_table(
        tmp_path / "extract" / "activations").select(["doc_id", "pos"]).columns]))}
    rows = [key[(d, p)] for d, p in zip(feats.column("doc_id").to_pylist(), feats.column("pos").to_pylist())]
    z[rows, feats.column("feature").to_numpy()] = torch.from_numpy(feats.column("value").to_numpy())
    xt = torch.from_numpy(x)
    with torch.no_grad():
        assert torch.allclose(z, sae.encode(xt) * torch.tensor([f in live for f in range(56)]), atol=1e-6)
        rec = sae.decode(z)
    fvu_raw = float(((rec - xt).double() ** 2).sum() / ((xt - xt.mean(0)).double() ** 2).sum())
    if summary["dead_in_training"] == 0:
        assert fvu_raw == pytest.approx(summary["fvu_raw"], rel=1e-3)
    assert summary["fvu"] < 0.3 and summary["l0"] == pytest.approx(feats.num_rows / 3000, rel=0.2)
    assert 0 < summary["nmse"] < 1 and summary["fve"] == pytest.approx(1 - summary["fvu"])


def test_stage_rejects_bad_input_before_starting_ray(tiny_cfg, tmp_path):
    from ray_jobs import sae

    run = tmp_path / "run"
    write_extract_stage(run, tokens=300, table_edit=lambda i, t: t.drop_columns(["L00_k_proj"]))
    with pytest.raises(SAEInputError, match=r"part-00000.parquet: missing 1 component column.*L00_k_proj"):
        sae.run(tiny_cfg(run_dir=run))
    assert not (run / "sae" / "_SUCCESS").exists()
    with pytest.raises(SAEInputError, match=r"sae.batch_size \(4096\) exceeds the 300 tokens"):
        write_extract_stage(tmp_path / "small", tokens=300)
        sae.run(tiny_cfg("sae.batch_size=4096", run_dir=tmp_path / "small"))
