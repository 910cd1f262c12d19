"""The one training harness (rank1_core/harness.py) on a small least-squares objective, and the
one scaling section every trained stage shares. Fast tier: no model, no Ray."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1_core import harness
from rank1_core.config import ConfigError, SAEConfig, Scaling, TrainConfig, TranscoderConfig, config_from_dict
from rank1_core.harness import Micro, Plan, TrainError, TrainState, load_checkpoint, metrics_table, save_checkpoint
from rank1_core.train import Doc, DocSteps


class LeastSquares(harness.TorchOptimizer):
    """y = x @ w by SGD: an objective of the harness's protocol that records what it saw."""

    name = "lsq"
    rank, world_size, sharded_checkpoint = 0, 1, False

    def __init__(self, held: bool = False):
        self.w = torch.zeros(3, requires_grad=True)
        self.params = [self.w]
        self.opt = torch.optim.SGD(self.params, lr=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.max_grad_norm = 0.0
        self.held = held

    def micro_step(self, data, last):
        _, x, y = data
        loss = ((x @ self.w - y) ** 2).sum()
        loss.backward()
        return torch.tensor([float(loss.detach()), float(len(y))], dtype=torch.float64)

    def row(self, totals, count):
        return {"loss": totals[0] / totals[1], "micro": count}

    def evaluate(self):
        return {"heldout_loss": float(self.w.detach().norm())} if self.held else None

    def describe(self, row):
        return f"lsq {row['loss']:.3f}"

    def save(self, d: Path):
        torch.save({"w": self.w.detach(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, d / "o.pt")

    def load(self, d: Path):
        blob = torch.load(d / "o.pt", weights_only=False)
        with torch.no_grad():
            self.w.copy_(blob["w"])
        self.opt.load_state_dict(blob["opt"])
        self.sched.load_state_dict(blob["sched"])

    def export(self, d: Path):
        pass


class Rows:
    """A step source over 12 rows: each epoch its own permutation, 2 micro-batches of 2 per step."""

    def __init__(self, short_epoch: int | None = None):
        rng = np.random.default_rng(0)
        self.x = torch.tensor(rng.normal(size=(12, 3)), dtype=torch.float32)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.short_epoch = short_epoch

    def order(self, epoch):
        return np.random.default_rng([7, epoch]).permutation(12).tolist()

    def epoch(self, epoch, start):
        o = self.order(epoch)
        steps = [[o[i:i + 2], o[i + 2:i + 4]] for i in range(0, 12, 4)]
        ran = steps[start:-1] if epoch == self.short_epoch else steps[start:]
        return len(steps), iter([[Micro((mb, self.x[mb], self.y[mb]), len(mb)) for mb in s] for s in ran])


def test_epochs_steps_checkpoints_and_rows():
    obj, src = LeastSquares(held=True), Rows()
    seen_ckpt = []
    state = harness.train(obj, src, Plan(epochs=2, limit=6), report=lambda r, s, c: c and seen_ckpt.append(s.step))
    assert state.finished and state.step == 6 and state.tokens == 24
    assert seen_ckpt == [3, 6]  # checkpoint_every 0: at each epoch end (the last step included)
    assert [r["step"] for r in state.history] == list(range(7))
    assert state.history[0]["heldout_loss"] == 0.0 and "loss" not in state.history[0]
    assert [r["epoch"] for r in state.history[1:]] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    assert all(r["micro"] == 2 and r["tokens"] == 4 for r in state.history[1:])
    held = [r["heldout_loss"] for r in state.history if not math.isnan(r.get("heldout_loss", math.nan))]
    assert len(held) == 3  # start, end of epoch 1, end of epoch 2


def test_each_epoch_trains_on_its_own_order_of_doc_steps():
    """The loop asks the source for each epoch's plan (a second epoch does not reuse the first's)."""
    docs = [Doc(i, np.arange(5 + i % 7, dtype=np.int64), np.ones(5 + i % 7, dtype=np.int8)) for i in range(40)]
    src = DocSteps(docs, batch_tokens=40, grad_accum=1, seed=3, pad_id=0)
    asked = []
    real_epoch = src.epoch

    class Recording:
        def epoch(self, e, start):
            asked.append((e, start))
            return real_epoch(e, start)

    class Shapes(LeastSquares):
        ids: list = []

        def micro_step(self, data, last):
            self.ids.append(data.input_ids.shape)
            return torch.tensor([1.0, 1.0], dtype=torch.float64)

        def step(self):
            return 0.0

    obj = Shapes()
    limit = src.total(2)
    state = harness.train(obj, Recording(), Plan(epochs=2, limit=limit))
    assert asked == [(0, 0), (1, 0)] and state.step == limit
    want = [tuple(m.data.input_ids.shape) for e in (0, 1) for s in src.epoch(e, 0)[1] for m in s]
    assert [tuple(s) for s in obj.ids] == want
    assert src.plan(0) != src.plan(1)


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    full = LeastSquares()
    harness.train(full, Rows(), Plan(epochs=3, limit=9, checkpoint_every=2))

    part = LeastSquares()

    class Stop(Exception):
        pass

    def report(row, state, ckpt):
        if ckpt and state.step == 4:
            save_checkpoint(part, state, tmp_path / "ck")
            raise Stop

    with pytest.raises(Stop):
        harness.train(part, Rows(), Plan(epochs=3, limit=9, checkpoint_every=2), report=report)
    again = LeastSquares()
    state = load_checkpoint(again, tmp_path / "ck")
    assert (state.step, state.epoch, state.step_in_epoch, state.finished) == (4, 1, 1, False)
    state = harness.train(again, Rows(), Plan(epochs=3, limit=9, checkpoint_every=2), state)
    assert state.step == 9 and torch.equal(again.w, full.w)
    with pytest.raises(TrainError, match="has no train_state.json"):
        load_checkpoint(LeastSquares(), tmp_path)


def test_the_last_checkpoint_is_marked_finished_and_max_steps_stops_mid_epoch():
    states = []
    harness.train(LeastSquares(), Rows(), Plan(epochs=2, limit=4),
                  report=lambda r, s, c: c and states.append(TrainState.from_json(s.to_json())))
    assert [(s.step, s.finished) for s in states] == [(3, False), (4, True)]


def test_a_source_that_runs_short_fails_naming_the_epoch():
    with pytest.raises(TrainError, match=r"\[lsq\] epoch 1 ended after 2 of its 3 steps"):
        harness.train(LeastSquares(), Rows(short_epoch=1), Plan(epochs=2, limit=6), name="lsq")


def test_metrics_table_types_and_nulls():
    t = metrics_table([{"step": 0, "loss": float("nan")}, {"step": 1, "loss": 0.5, "tokens": 3.0}],
                      ["step", "loss", "tokens"])
    assert t.schema.field("step").type == "int64" and t.schema.field("loss").type == "double"
    assert t.to_pylist() == [{"step": 0, "loss": None, "tokens": None}, {"step": 1, "loss": 0.5, "tokens": 3}]


# --------------------------------------------------------------------------- one scaling section


def test_every_trained_stage_has_the_same_scaling_keys_and_defaults():
    names = [f for f in Scaling.__dataclass_fields__]
    assert names == ["num_workers", "cpus_per_worker", "gpus_per_worker", "keep_checkpoints", "max_failures"]
    for cls in (TrainConfig, SAEConfig, TranscoderConfig):
        cfg = cls()
        assert isinstance(cfg, Scaling)
        assert {n: getattr(cfg, n) for n in names} == {n: getattr(Scaling(), n) for n in names}
    assert Scaling().max_failures == 2


@pytest.mark.parametrize("section", ["train", "sae", "transcoder"])
@pytest.mark.parametrize("key, value, match", [
    ("num_workers", 0, "must be >= 1, got 0"),
    ("gpus_per_worker", -1, "must be >= 0, got -1"),
    ("max_failures", -2, "must be >= -1, got -2"),
])
def test_scaling_checks_name_the_section(section, key, value, match):
    with pytest.raises(ConfigError, match=rf"{section}\.{key} {match}"):
        config_from_dict({section: {key: value}})


def test_the_old_sae_use_gpu_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"'sae.use_gpu' was replaced by sae.gpus_per_worker .*gpus_per_worker: 1"):
        config_from_dict({"sae": {"use_gpu": True}})
    assert config_from_dict({"sae": {"gpus_per_worker": 1}}).sae.gpus_per_worker == 1
