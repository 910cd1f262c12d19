"""Adapter ablations: KL(ablated || full adapter), teacher-forced on held-out traces (Figure 1),
and ablated adapters written as ordinary peft adapters (Table 2).

A component `L{layer:02d}_{module}` is one rank-1 LoRA matrix pair (rank r: each direction
`L{layer:02d}_{module}_r{i}` is one row of lora_A; names in `rank1_core.lora`). Ablating it
zeroes its lora_A output (the per-token scalar), which removes its whole contribution
`lora_B(lora_A(x)) * scaling` exactly (rank r: that direction's share of it); here a forward hook on `lora_A` multiplies the scalar
by a per-row 0/1 mask, so one batch carries many ablations side by side.

The KL of an ablation at a position is KL(p_ablated || p_full) over the next-token
distribution, averaged over the positions that predict an assistant token (loss_mask 1) of
held-out traces.

Work is shared three ways:
- one reference forward pass (the full adapter) per batch of traces serves every ablation:
  its next-token log-probabilities are the right side of every KL;
- the reference pass records the input of every decoder layer (and the arguments each layer
  was called with); an ablation whose first ablated component sits in layer l restarts from
  layer l's recorded input, skipping the layers before it (a layer's 7 components and the
  whole layer start together: one pass of 8 ablations x traces rows);
- logits are computed only at the scored positions.
The restart is checked once against the model's own forward; a model where it does not
match exactly falls back to full passes.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from rank1_core.lora import (ATTN_MODULES, MLP_MODULES, MODULES, component_name, direction_names,  # noqa: F401
                             lora_key, module_kind, module_of, parse_component, parse_direction, parse_module)
from rank1_core.lora import component_sort_key as _sort_key
from rank1_core.models import decoder as _find_decoder
from rank1_core.rundir import atomic_dir


# --------------------------------------------------------------------------- ablation plans


@dataclass(frozen=True)
class Ablation:
    """A set of components zeroed together."""

    name: str
    """Component name, `layer_LL`, `<group>` or `none`."""
    kind: str
    """'component', 'module' (all r directions of a rank-r module), 'layer', 'group' or 'none'."""
    components: frozenset[str]
    layer: int | None = None
    module: str | None = None

    @property
    def start_layer(self) -> int | None:
        """First layer whose computation changes (None: nothing ablated)."""
        return min((parse_component(c)[0] for c in self.components), default=None)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "components": sorted(self.components, key=_sort_key),
                "layer": self.layer, "module": self.module}

    @classmethod
    def from_dict(cls, d: dict) -> "Ablation":
        return cls(d["name"], d["kind"], frozenset(d["components"]), d.get("layer"), d.get("module"))


def group_components(components: Iterable[str], modules: Iterable[str], layers: Iterable[int] = ()) -> frozenset[str]:
    """Components of `modules` in `layers` (empty: every layer)."""
    mods, lays = set(modules), set(layers)
    out = set()
    for c in components:
        layer, module = parse_component(c)
        if module in mods and (not lays or layer in lays):
            out.add(c)
    return frozenset(out)


def plan_ablations(components: Iterable[str], *, per_component: bool = True, per_layer: bool = True,
                   groups: Iterable[tuple[str, Iterable[str], Iterable[int]]] = ()) -> list[Ablation]:
    """Every single component, every whole layer, and each (name, modules, layers) group; for a
    rank-r adapter (r > 1) also every module (its r directions together), named like a rank-1
    component (`L05_q_proj`)."""
    comps = sorted(set(components), key=_sort_key)
    out: list[Ablation] = []
    if per_component:
        for c in comps:
            layer, module = parse_component(c)
            out.append(Ablation(c, "component", frozenset([c]), layer, module))
        by_module: dict[str, list[str]] = {}
        for c in comps:
            if parse_direction(c)[2] is not None:
                by_module.setdefault(module_of(c), []).append(c)
        for name, members in by_module.items():
            layer, module = parse_component(name)
            out.append(Ablation(name, "module", frozenset(members), layer, module))
    if per_layer:
        for layer in sorted({parse_component(c)[0] for c in comps}):
            out.append(Ablation(f"layer_{layer:02d}", "layer",
                                frozenset(c for c in comps if parse_component(c)[0] == layer), layer))
    for name, modules, layers in groups:
        members = group_components(comps, modules, layers)
        if not members:
            raise ValueError(f"ablation group {name!r} selects no component of the adapter "
                             f"(modules {sorted(modules)}, layers {sorted(layers) or 'all'})")
        out.append(Ablation(name, "group", members))
    names = [a.name for a in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"ablation names collide: {dup}")
    return out


def schedule(ablations: list[Ablation], per_pass: int) -> list[list[Ablation]]:
    """Passes of at most `per_pass` ablations sharing a start layer (latest first)."""
    by_start: dict[int, list[Ablation]] = {}
    for a in ablations:
        s = a.start_layer
        by_start.setdefault(-1 if s is None else s, []).append(a)
    passes = []
    for s in sorted(by_start, reverse=True):
        group = by_start[s]
        passes.extend(group[i:i + per_pass] for i in range(0, len(group), per_pass))
    return passes


# --------------------------------------------------------------------------- the adapter


def lora_components(model) -> dict[str, object]:
    """Component name -> the `lora_A` module of the active adapter, for a peft model (rank r:
    the r directions of a module all map to its lora_A; `direction_index` says which row)."""
    out: dict[str, object] = {}
    for path, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys"):
            continue
        lm = parse_module(path)
        if lm is None or not path.endswith(lm[1]):
            continue
        active = [a for a in getattr(mod, "active_adapters", ["default"]) if a in lora_a]
        if not active:
            continue
        a = lora_a[active[0]]
        for name in direction_names(*lm, a.out_features):
            out[name] = a
    if not out:
        raise ValueError("the model has no LoRA layers on q/k/v/o/gate/up/down_proj of its decoder layers")
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def direction_index(name: str) -> int:
    """Row of lora_A (and column of lora_B) that a component is: 0 for a rank-1 name."""
    d = parse_direction(name)[2]
    return 0 if d is None else d


def hooked_modules(comps: dict[str, object], names: Iterable[str]) -> list[tuple[object, list[str]]]:
    """(lora_A module, the names of all its directions in row order) for each module some name
    in `names` is on: one hook per module serves every direction of a rank-r module."""
    want = set(names)
    by_mod: dict[int, tuple[object, list[str]]] = {}
    for name, mod in comps.items():
        by_mod.setdefault(id(mod), (mod, []))[1].append(name)
    out = []
    for mod, all_names in by_mod.values():
        if want & set(all_names):
            out.append((mod, sorted(all_names, key=direction_index)))
    return out


def write_ablated_adapter(adapter_dir: str | Path, zero: Iterable[str], out_dir: str | Path) -> list[str]:
    """Copy a peft adapter with the lora_A of each component in `zero` set to zero (an exact
    ablation that any LoRA server, vLLM included, serves as an ordinary adapter). Returns
    the zeroed components."""
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    wfile = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").exists() or not wfile.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a saved peft adapter (adapter_config.json + adapter_model.safetensors)")
    zero = set(zero)
    tensors = load_file(str(wfile))
    done = []
    for key, t in tensors.items():
        lk = lora_key(key)
        if lk is None or lk[2] != "A":
            continue
        names = direction_names(lk[0], lk[1], t.shape[0])
        rows = [i for i, n in enumerate(names) if n in zero]
        if rows:
            t = t.clone()
            t[rows] = 0  # a rank-1 lora_A is one row: the whole tensor
            tensors[key] = t
            done.extend(names[i] for i in rows)
    missing = sorted(zero - set(done))
    if missing:
        raise ValueError(f"adapter {adapter_dir} has no component {missing[0]} to ablate")
    with atomic_dir(out_dir) as tmp:  # the adapter folder appears whole or not at all
        save_file(tensors, str(tmp / wfile.name), metadata={"format": "pt"})
        shutil.copy(adapter_dir / "adapter_config.json", tmp / "adapter_config.json")
        (tmp / "ablated_components.json").write_text(json.dumps(sorted(done, key=_sort_key)) + "\n")
    return sorted(done, key=_sort_key)


# --------------------------------------------------------------------------- KL


def kl_per_position(ablated_logits, ref_logp):
    """KL(softmax(ablated) || exp(ref_logp)) per row, in float32 (natural log)."""
    import torch

    la = torch.log_softmax(ablated_logits.float(), dim=-1)
    return (la.exp() * (la - ref_logp)).sum(-1)


def _decoder(model):
    base, dec = _find_decoder(model)
    if not hasattr(dec, "norm"):
        raise ValueError(f"{type(base).__name__}: its decoder has no final .norm")
    return base, dec


def _tile(x, k: int, b: int):
    """Repeat a recorded layer argument for k ablations of b traces (rows k-major)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() and x.shape[0] == b and k > 1 else x
    if isinstance(x, tuple):
        return tuple(_tile(v, k, b) for v in x)
    if isinstance(x, list):
        return [_tile(v, k, b) for v in x]
    if isinstance(x, dict):
        return {n: _tile(v, k, b) for n, v in x.items()}
    return x


@dataclass
class KLResult:
    """Per (ablation, trace): sums over the trace's scored positions."""

    rows: list[dict] = field(default_factory=list)
    """ablation, doc_id, kl_sum, kl_sumsq, kl_max, n_tokens."""


class KLAblator:
    """KL of every ablation against the full adapter, on batches of teacher-forced traces.

    `model` is a peft model in eval mode (the full adapter active). Tests call it directly;
    the ablate stage wraps it in a Ray Data actor (`KLWorker`).
    """

    def __init__(self, model, ablations: list[Ablation], ablations_per_pass: int = 8, restart: bool = True):
        import torch

        self.torch = torch
        self.model = model
        self.ablations = list(ablations)
        self.base, self.decoder = _decoder(model)
        self.head = self.base.get_output_embeddings()
        self.layers = list(self.decoder.layers)
        self.comps = lora_components(model)
        unknown = sorted({c for a in self.ablations for c in a.components} - set(self.comps), key=str)
        if unknown:
            raise ValueError(f"ablation names component {unknown[0]} that the adapter does not have "
                             f"(it has {len(self.comps)}: {next(iter(self.comps))} ...)")
        self.passes = schedule(self.ablations, ablations_per_pass)
        self.restart = restart
        self._checked = False
        self._masks: dict[str, object] = {}
        self._hooks = [mod.register_forward_hook(self._mask_hook(names))
                       for mod, names in hooked_modules(self.comps, self.comps)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _mask_hook(self, names: list[str]):
        if len(names) == 1:  # rank 1: one scalar per token
            name = names[0]

            def hook(module, args, output):
                m = self._masks.get(name)
                return output if m is None else output * m
            return hook

        def hook_r(module, args, output):  # rank r: one 0/1 column per direction
            ms = [self._masks.get(n) for n in names]
            if all(m is None for m in ms):
                return output
            ref = next(m for m in ms if m is not None)
            ones = ref.new_ones(ref.shape)
            return output * self.torch.cat([ones if m is None else m for m in ms], dim=-1)
        return hook_r

    # ---- passes ----------------------------------------------------------------------

    def _record(self, ids, attn):
        """Reference pass: normed final hidden states plus every layer's input and arguments."""
        torch = self.torch
        rec_in: dict[int, tuple] = {}
        handles = []
        for i, layer in enumerate(self.layers):
            def pre(mod, args, kwargs, i=i):
                rec_in[i] = (args, kwargs)
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        norm_in = {}
        handles.append(self.decoder.norm.register_forward_pre_hook(
            lambda mod, args: norm_in.__setitem__("h", args[0])))
        try:
            out = self.decoder(input_ids=ids, attention_mask=attn, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state, rec_in, norm_in["h"]

    def _restart(self, start: int, rec_in, h_final, k: int, b: int):
        """Normed final hidden states of k copies of the batch, restarted at layer `start`."""
        if start >= len(self.layers):
            return self.decoder.norm(_tile(h_final, k, b))
        args, kwargs = rec_in[start]
        h = _tile(args[0] if args else kwargs["hidden_states"], k, b)
        for i in range(start, len(self.layers)):
            a, kw = rec_in[i]
            kw = _tile({n: v for n, v in kw.items() if n != "hidden_states"}, k, b)
            out = self.layers[i](h, *_tile(tuple(a[1:]), k, b), **kw)
            h = out[0] if isinstance(out, tuple) else out
        return self.decoder.norm(h)

    def _check_restart(self, ids, attn, h_ref, rec_in, h_final) -> None:
        torch = self.torch
        ok = True
        try:
            h0 = self._restart(0, rec_in, h_final, 1, ids.shape[0])
            scale = float(h_ref.abs().max()) or 1.0
            ok = bool(torch.allclose(h0, h_ref, rtol=0, atol=1e-5 * scale))
        except Exception as e:  # noqa: BLE001 - any failure means the model needs full passes
            warnings.warn(f"KL ablation: restarting at a layer failed ({e}); using full forward passes")
            ok = False
        if not ok:
            warnings.warn("KL ablation: restarting at a layer does not reproduce the model's forward; "
                          "using full forward passes")
            self.restart = False
        self._checked = True

    @staticmethod
    def scored_positions(loss_mask: list[list[int]], width: int):
        """(row, position) pairs whose next token is an assistant token (loss_mask 1)."""
        pos = []
        for r, m in enumerate(loss_mask):
            pos.extend((r, t) for t in range(min(len(m), width) - 1) if m[t + 1])
        return pos

    def __call__(self, doc_ids: list[int], input_ids: list[list[int]], loss_mask: list[list[int]]) -> KLResult:
        torch = self.torch
        b = len(input_ids)
        width = max(len(x) for x in input_ids)
        ids = torch.zeros((b, width), dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        for r, x in enumerate(input_ids):
            ids[r, :len(x)] = torch.tensor(list(x), dtype=torch.long)
            attn[r, :len(x)] = 1
        pos = self.scored_positions(loss_mask, width)
        res = KLResult()
        if not pos:
            return res
        dev = self.head.weight.device  # the model's device (cuda or cpu)
        ids, attn = ids.to(dev), attn.to(dev)
        rows_idx = torch.tensor([p[0] for p in pos], device=dev)
        t_idx = torch.tensor([p[1] for p in pos], device=dev)
        self._masks = {}
        with torch.inference_mode():
            h_ref, rec_in, h_final = self._record(ids, attn)
            if self.restart and not self._checked:
                self._check_restart(ids, attn, h_ref, rec_in, h_final)
            ref_logp = torch.log_softmax(self.head(h_ref[rows_idx, t_idx]).float(), dim=-1)
            for group in self.passes:
                k = len(group)
                for name in {c for a in group for c in a.components}:
                    keep = torch.tensor([0.0 if name in a.components else 1.0 for a in group], device=dev)
                    self._masks[name] = keep.repeat_interleave(b).view(k * b, 1, 1)
                try:
                    start = group[0].start_layer
                    if self.restart:
                        h = self._restart(len(self.layers) if start is None else start, rec_in, h_final, k, b)
                    else:
                        h = self.decoder(input_ids=ids.repeat(k, 1), attention_mask=attn.repeat(k, 1),
                                         use_cache=False).last_hidden_state
                finally:
                    self._masks = {}
                for j, a in enumerate(group):
                    kl = kl_per_position(self.head(h[j * b + rows_idx, t_idx]), ref_logp).double()
                    for r in range(b):
                        sel = kl[rows_idx == r]
                        if sel.numel() == 0:
                            continue
                        res.rows.append({"ablation": a.name, "doc_id": int(doc_ids[r]),
                                         "kl_sum": float(sel.sum()), "kl_sumsq": float((sel * sel).sum()),
                                         "kl_max": float(sel.max()), "n_tokens": int(sel.numel())})
        return res


def aggregate(rows, ablations: list[Ablation]):
    """Per-ablation mean KL over all scored tokens and its standard error (token level)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no scored tokens: the held-out traces have no assistant tokens")
    g = df.groupby("ablation").agg(kl_sum=("kl_sum", "sum"), kl_sumsq=("kl_sumsq", "sum"),
                                   kl_max=("kl_max", "max"), n_tokens=("n_tokens", "sum"),
                                   n_docs=("doc_id", "nunique"))
    out = []
    for a in ablations:
        if a.name not in g.index:
            raise ValueError(f"no KL rows for ablation {a.name!r}")
        r = g.loc[a.name]
        n = int(r.n_tokens)
        mean = float(r.kl_sum) / n
        var = max(float(r.kl_sumsq) / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else float("nan")
        out.append({"ablation": a.name, "kind": a.kind, "layer": a.layer, "module": a.module,
                    "n_components": len(a.components), "kl_mean": mean,
                    "kl_sem": math.sqrt(var / n) if n > 1 else float("nan"), "kl_max": float(r.kl_max),
                    "n_tokens": n, "n_docs": int(r.n_docs)})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- Ray Data actor


class KLWorker:
    """Ray Data actor: loads base + adapter once; input rows doc_id, input_ids, loss_mask;
    output KL rows per (ablation, trace)."""

    def __init__(self, model_dir: str, adapter_dir: str, ablations: list[dict], dtype: str = "float32",
                 batch_docs: int = 4, ablations_per_pass: int = 8, threads: int = 0):
        from rank1_core.generation import set_threads
        from rank1_core.models import load_model

        set_threads(threads)
        import tempfile

        from rank1_core.generation import local_dir

        self._tmp = tempfile.mkdtemp(prefix="rank1-kl-")
        model = load_model(local_dir(model_dir, self._tmp), dtype, adapter=local_dir(adapter_dir, self._tmp))
        self.batch_docs = batch_docs
        self.ablator = KLAblator(model, [Ablation.from_dict(d) for d in ablations], ablations_per_pass)

    def __call__(self, batch):
        import pandas as pd

        batch = pd.DataFrame(batch)
        rows: list[dict] = []
        for i in range(0, len(batch), self.batch_docs):
            part = batch.iloc[i:i + self.batch_docs]
            res = self.ablator([int(x) for x in part["doc_id"]], [list(x) for x in part["input_ids"]],
                               [list(x) for x in part["loss_mask"]])
            rows.extend(res.rows)
        return pd.DataFrame(rows, columns=["ablation", "doc_id", "kl_sum", "kl_sumsq", "kl_max", "n_tokens"])

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


# --------------------------------------------------------------------------- the ablate stage's inputs and tables


def heldout_docs(cfg) -> list[dict]:
    """Held-out traces (doc_id, input_ids, loss_mask) from prepare/tokens, first ablate.heldout_docs."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from rank1_core.rundir import RunDir

    prep = RunDir(cfg.run.dir).stage("prepare")
    ds = pads.dataset(prep.path("tokens"), filesystem=prep.fs, format="parquet")
    t = ds.to_table(columns=["doc_id", "split", "input_ids", "loss_mask"], filter=pc.field("split") == "heldout")
    t = t.sort_by("doc_id")
    if cfg.ablate.heldout_docs:
        t = t.slice(0, cfg.ablate.heldout_docs)
    if t.num_rows == 0:
        raise ValueError(f"{prep.uri_of('tokens')} has no held-out traces (split 'heldout'); "
                         "set data.heldout_traces > 0 and rerun prepare")
    return t.select(["doc_id", "input_ids", "loss_mask"]).to_pylist()


def kl_tables(agg, kind: str = "component"):
    """(components, layers, groups) KL tables from `rank1_core.ablation.aggregate`; with
    kind="module", the first is the per-module table of a rank-r adapter."""
    comps = agg[agg["kind"] == kind].copy()
    comps.insert(0, "column", comps["ablation"])
    comps["layer"] = comps["layer"].astype("int32")
    comps["kind"] = [module_kind(m) for m in comps["module"]]
    comps = comps[["column", "layer", "module", "kind", "kl_mean", "kl_sem", "kl_max", "n_tokens", "n_docs"]]
    layers = agg[agg["kind"] == "layer"].copy()
    layers["layer"] = layers["layer"].astype("int32")
    layers = layers[["layer", "n_components", "kl_mean", "kl_sem", "kl_max", "n_tokens", "n_docs"]]
    groups = agg[agg["kind"] == "group"][["ablation", "n_components", "kl_mean", "kl_sem"]].rename(
        columns={"ablation": "group"})
    return comps.reset_index(drop=True), layers.reset_index(drop=True), groups.reset_index(drop=True)


def kl_summary(comps, layers, top: int) -> str:
    """Which layers and modules matter most, as printed text."""
    lines = []
    if len(comps):
        lines.append(f"Top {min(top, len(comps))} components by KL(ablated || full adapter):")
        for r in comps.sort_values("kl_mean", ascending=False).head(top).itertuples():
            lines.append(f"  {r.column:<16} {r.kl_mean:.3e} ± {r.kl_sem:.1e}")
        by_mod = comps.groupby("module")["kl_mean"].mean().sort_values(ascending=False)
        lines.append("Mean KL by module: " + ", ".join(f"{m} {v:.3e}" for m, v in by_mod.items()))
        by_kind = comps.groupby("kind")["kl_mean"].mean()
        lines.append("Mean KL by kind: " + ", ".join(f"{k} {v:.3e}" for k, v in by_kind.items()))
    if len(layers):
        lines.append(f"Top {min(top, len(layers))} layers:")
        for r in layers.sort_values("kl_mean", ascending=False).head(top).itertuples():
            lines.append(f"  layer {r.layer:>3}  {r.kl_mean:.3e} ± {r.kl_sem:.1e}")
    return "\n".join(lines)


def group_table(groups_kl, t2, summary, names: list[str]):
    """groups.parquet with benchmarks: per group and benchmark its KL (`kl_tables`' groups),
    pass@1 (`summary`: rank1_core.benchmarks.summarize rows of variant `<group>_ablated`),
    and Table 2's base, lora and relative score (`t2`: rank1_core.grading.table2)."""
    import pandas as pd

    rows = []
    for name in names:
        kl = groups_kl[groups_kl["group"] == name].iloc[0]
        for r in t2.itertuples():
            s = summary[(summary["variant"] == f"{name}_ablated") & (summary["benchmark"] == r.benchmark)].iloc[0]
            rows.append({"group": name, "benchmark": r.benchmark, "n_components": int(kl.n_components),
                         "kl_mean": float(kl.kl_mean), "kl_sem": float(kl.kl_sem),
                         "n_problems": int(s.n_problems), "n_samples": int(s.n_samples),
                         "pass1": float(s.pass1), "stderr": float(s.stderr), "base": float(r.base),
                         "lora": float(r.lora), "relative": float(getattr(r, f"{name}_relative"))})
    return pd.DataFrame(rows)
