"""Per-token adapter activations and baseline MLP neurons, as Parquet.

With a rank-1 LoRA every adapted matrix adds `lora_B(lora_A(x)) * scaling`, and `lora_A(x)`
is one scalar per token: the component's activation. `Extractor` loads the base model with
the trained adapter once, records that scalar for every component with a forward hook on
`lora_A`, and (the paper's baseline) the first N inputs of every `down_proj` of the
*unadapted* model in a second pass with the adapter disabled.

Output, one file per batch of documents in each of three folders of the extract stage,
named by the batch's documents (`part-<first doc>-<hash of doc ids>.parquet`), written to a
temporary name and renamed into place, so a retried batch replaces its own file and a
rerun never duplicates rows:

- ``activations/``: doc_id int64, pos int32, token_id int32, then one float32 column per
  adapter component, ``L{layer:02d}_{module}`` (3 digits for models with >= 100 layers; a
  rank-r adapter has r columns per module, ``L{layer:02d}_{module}_r{i}``, the scalar of
  row i of lora_A: names in `rank1_core.lora`);
- ``neurons/``: doc_id, pos, then float32 ``N{layer:02d}_{idx:04d}`` for the first N neurons
  of every MLP (the activation entering down_proj, adapter disabled);
- ``tokens/``: doc_id, pos, token_id, token (decoded text of that one token), split.

Beside them, ``components.parquet`` (component_id = layer * 7 + module index, times r plus
the direction for rank r; column, layer, module, kind mlp|attn, a_norm and b_norm of the
direction's row of lora_A and column of lora_B, scaling) and ``neuron_catalogue.parquet`` (column,
layer, neuron).

No `ray` here: Ray Data makes `Extractor` an actor (`ray_jobs/extract.py`); tests call it
directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rank1_core.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MLP_MODULES, MODULES,  # noqa: F401
                             component_id, component_name, layer_digits, lora_key, module_kind, parse_module)
from rank1_core.rundir import TMP_PREFIX, RunDir, StageDir, atomic_output

TABLES = ("activations", "neurons", "tokens")
_TMP = TMP_PREFIX


class ExtractError(RuntimeError):
    """Extraction cannot run on this input (no adapter, wrong rank, empty traces); says which."""


# --------------------------------------------------------------------------- names


def component_column(layer: int, module: str, num_layers: int, direction: int | None = None) -> str:
    return component_name(layer, module, direction, num_layers)


def neuron_column(layer: int, neuron: int, num_layers: int) -> str:
    return f"N{layer:0{layer_digits(num_layers)}d}_{neuron:04d}"


@dataclass(frozen=True)
class Component:
    layer: int
    module: str
    column: str
    direction: int = 0
    """Row of lora_A (0 for rank 1)."""
    rank: int = 1

    @property
    def component_id(self) -> int:
        return component_id(self.layer, self.module, self.direction, self.rank)

    @property
    def kind(self) -> str:
        return module_kind(self.module)


# --------------------------------------------------------------------------- the adapter on disk


@dataclass
class AdapterInfo:
    path: Path
    config: dict
    components: list[Component]
    a_norm: dict[str, float]
    b_norm: dict[str, float]
    scaling: float


def check_adapter_dir(path: str | Path, producer: str = "the train stage") -> Path:
    """The adapter folder, or a clear error saying what is missing and who makes it."""
    p = Path(path)
    if not (p / ADAPTER_CONFIG).exists() or not (p / ADAPTER_WEIGHTS).exists():
        have = sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        raise ExtractError(
            f"no trained adapter at {p} (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; found "
            f"{have or 'nothing'}): run {producer} first"
        )
    return p


def read_adapter(path: str | Path, num_layers: int) -> AdapterInfo:
    """Components and the norms of their A and B vectors, from the saved files (no model)."""
    from safetensors.torch import load_file

    p = check_adapter_dir(path)
    config = json.loads((p / ADAPTER_CONFIG).read_text())
    where = p / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise ExtractError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r", 0)
    if not isinstance(rank, int) or rank < 1:
        raise ExtractError(f"{where}: r = {rank!r}; expected a positive integer")
    if config.get("use_dora"):
        raise ExtractError(f"{where}: use_dora is set; a DoRA adapter's output is not lora_B(lora_A(x))")
    if config.get("rank_pattern"):
        raise ExtractError(f"{where}: rank_pattern {config['rank_pattern']!r} gives some modules another rank")
    # peft multiplies lora_B(lora_A(x)) by alpha / r (rsLoRA: alpha / sqrt(r)); both are alpha at r = 1.
    alpha = float(config.get("lora_alpha", 1))
    scaling = alpha if rank == 1 else alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    weights = load_file(str(p / ADAPTER_WEIGHTS))
    a_norm, b_norm, comps = {}, {}, {}
    for key, w in weights.items():
        part = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
        if part is None:
            raise ExtractError(f"{p / ADAPTER_WEIGHTS}: unexpected tensor {key!r} (only lora_A/lora_B supported)")
        lm = parse_module(key)
        if lm is None:
            raise ExtractError(f"{p / ADAPTER_WEIGHTS}: tensor {key!r} is not on one of {', '.join(MODULES)} "
                               "of a decoder layer")
        layer, module = lm
        if layer >= num_layers:
            raise ExtractError(f"{p / ADAPTER_WEIGHTS}: {key!r} is on layer {layer}, the model has {num_layers}")
        got = w.shape[0] if part == "A" else w.shape[-1]
        if got != rank:
            raise ExtractError(f"{where}: r = {rank} but tensor {key!r} has rank {got}")
        for d in range(rank):
            col = component_column(layer, module, num_layers, None if rank == 1 else d)
            comps[col] = Component(layer, module, col, d, rank)
            vec = w[d] if part == "A" else w[:, d]
            (a_norm if part == "A" else b_norm)[col] = float(vec.float().norm())
    if not comps:
        raise ExtractError(f"{p / ADAPTER_WEIGHTS}: holds no LoRA tensor")
    half = sorted(set(a_norm) ^ set(b_norm))
    if half:
        raise ExtractError(f"{p / ADAPTER_WEIGHTS}: components {half} have only one of lora_A / lora_B")
    ordered = sorted(comps.values(), key=lambda c: c.component_id)
    return AdapterInfo(p, config, ordered, a_norm, b_norm, scaling)


def components_table(info: AdapterInfo) -> pa.Table:
    cs = info.components
    return pa.table({
        "component_id": pa.array([c.component_id for c in cs], pa.int32()),
        "column": pa.array([c.column for c in cs], pa.string()),
        "layer": pa.array([c.layer for c in cs], pa.int32()),
        "module": pa.array([c.module for c in cs], pa.string()),
        "kind": pa.array([c.kind for c in cs], pa.string()),
        "a_norm": pa.array([info.a_norm[c.column] for c in cs], pa.float64()),
        "b_norm": pa.array([info.b_norm[c.column] for c in cs], pa.float64()),
        "scaling": pa.array([info.scaling] * len(cs), pa.float64()),
    })


def neuron_columns(num_layers: int, n: int) -> list[tuple[str, int, int]]:
    return [(neuron_column(l, i, num_layers), l, i) for l in range(num_layers) for i in range(n)]


def neuron_catalogue_table(num_layers: int, n: int) -> pa.Table:
    rows = neuron_columns(num_layers, n)
    return pa.table({
        "column": pa.array([r[0] for r in rows], pa.string()),
        "layer": pa.array([r[1] for r in rows], pa.int32()),
        "neuron": pa.array([r[2] for r in rows], pa.int32()),
    })


def local_adapter(train: StageDir, rel: str = "adapter") -> Path:
    """A local path to the trained adapter (downloaded to a temp dir if the run is remote)."""
    if train.is_local:
        return train.local_path(rel)
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="rank1-adapter-"))
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not train.exists(rel, name):
            raise ExtractError(f"no trained adapter at {train.uri_of(rel)} (missing {name}): run the train stage first")
        pafs.copy_files(train.path(rel, name), str(dest / name), source_filesystem=train.fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return dest


# --------------------------------------------------------------------------- hooks


class ActivationCapture:
    """Forward hooks on a peft model: `lora_A(x)` per component (each of its r outputs for a
    rank-r module) and the first N inputs of every `down_proj`. Record inside
    `with capture.record("adapter"|"neurons"): model(...)`."""

    def __init__(self, peft_model, num_layers: int, mlp_neurons: int):
        from peft.tuners.lora import LoraLayer

        self.num_layers = num_layers
        self.mlp_neurons = mlp_neurons
        self.components: list[Component] = []
        self._mode: str | None = None
        self.adapter: dict[str, "object"] = {}
        self.neurons: dict[int, "object"] = {}
        self._handles = []
        found = {}
        for name, mod in peft_model.named_modules():
            if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
                lm = parse_module(name)
                if lm is None:
                    raise ExtractError(f"adapted module {name!r} is not one of {', '.join(MODULES)} of a decoder layer")
                found[lm] = mod
        ranks = {mod.lora_A["default"].out_features for mod in found.values()}
        if len(ranks) > 1:
            raise ExtractError(f"adapted modules have different ranks {sorted(ranks)}; rank1 reads one rank per adapter")
        for (layer, module), mod in sorted(found.items(), key=lambda kv: component_id(*kv[0])):
            r = mod.lora_A["default"].out_features
            comps = [Component(layer, module, component_column(layer, module, num_layers, None if r == 1 else d), d, r)
                     for d in range(r)]
            self.components.extend(comps)
            self._handles.append(mod.lora_A["default"].register_forward_hook(self._adapter_hook([c.column for c in comps])))
        if mlp_neurons:
            from rank1_core.models import decoder_layers

            layers = decoder_layers(peft_model)
            for i, layer in enumerate(layers):
                down = layer.mlp.down_proj
                self._handles.append(down.register_forward_pre_hook(self._neuron_hook(i)))

    def _adapter_hook(self, columns: list[str]):
        def hook(_mod, _inp, out):
            if self._mode == "adapter":
                for d, column in enumerate(columns):
                    self.adapter[column] = out[..., d].detach()
        return hook

    def _neuron_hook(self, layer: int):
        def hook(_mod, args):
            if self._mode == "neurons":
                self.neurons[layer] = args[0][..., : self.mlp_neurons].detach()
        return hook

    @contextmanager
    def record(self, mode: str) -> Iterator[None]:
        self.adapter, self.neurons = {}, {}
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------- batching


def plan_forward_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group document indices into forward passes of at most `batch_tokens` padded tokens
    (documents sorted by length so padding stays small; a longer document runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def batch_name(doc_ids: Sequence[int]) -> str:
    """Deterministic file name of a batch of documents: the same documents, the same name."""
    ids = sorted(int(d) for d in doc_ids)
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:12]
    return f"part-{ids[0]:010d}-{digest}.parquet"


@dataclass
class Extracted:
    """One batch of documents: the three tables, rows sorted by (doc_id, pos)."""

    tokens: pa.Table
    activations: pa.Table
    neurons: pa.Table | None


def write_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, compression: str,
                 use_dictionary: bool | list[str] = False, before_rename=None) -> None:
    """Write to a temporary name in the same folder, then rename into place (the one writer,
    `rank1_core.rundir.atomic_output`; `before_rename` is a test hook run before the rename)."""
    with atomic_output(fs, path, before_rename) as out:
        pq.write_table(table, out, compression=None if compression == "none" else compression,
                       use_dictionary=use_dictionary)


def max_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include a forking
    parent's peak on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """CPU time this process has used so far, all threads (a fair clock on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Extractor:
    """Loads the model with the adapter once; `__call__` turns a batch of documents into the
    three Parquet files (a Ray Data callable class) and returns a one-row summary.

    `crash` is a test hook that kills this process for real on its first batch:
    {"marker": path, "when": "after_write" | "before_rename"}; the first process to create
    the marker file dies (os._exit) at that point, every later one runs normally.
    """

    def __init__(self, model_dir, adapter_dir: str | None, run_uri: str | None = None, *, stage: str = "extract",
                 stage_folder: str | None = None, mlp_neurons: int = 60,
                 batch_tokens: int = 4096, dtype: str = "float32", device: str = "cpu",
                 torch_threads: int | None = None, compression: str = "zstd",
                 splits: Sequence[str] = ("train", "heldout"), crash: dict | None = None):
        import torch

        from rank1_core.config import ModelConfig
        from rank1_core.models import load_model, load_tokenizer, resolve_model_dir

        if isinstance(model_dir, ModelConfig):  # resolved where the actor runs (each node has its own cache)
            model_dir = resolve_model_dir(model_dir)
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if adapter_dir is None:
            if run_uri is None:
                raise ExtractError("Extractor needs adapter_dir or run_uri (to read train/adapter)")
            adapter_dir = str(local_adapter(RunDir(run_uri).stage("train")))
        check_adapter_dir(adapter_dir)
        self.device = device
        self.batch_tokens = batch_tokens
        self.compression = compression
        self.splits = set(splits)
        self.crash = crash
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype=dtype, adapter=adapter_dir, device=device)
        from rank1_core.models import decoder

        lm, self.decoder = decoder(self.model)
        self.num_layers = len(self.decoder.layers)
        inter = lm.config.intermediate_size
        self.mlp_neurons = min(mlp_neurons, inter)
        self.capture = ActivationCapture(self.model, self.num_layers, self.mlp_neurons)
        self.columns = [c.column for c in self.capture.components]
        self.neuron_columns = [c for c, _, _ in neuron_columns(self.num_layers, self.mlp_neurons)]
        self._token_text: dict[int, str] = {}
        self.stage: StageDir | None = None
        if run_uri is not None:
            # stage_folder: where the driver builds this run's outputs (`.staging/<stage>` when a
            # finished stage is being redone beside its old outputs).
            self.stage = StageDir(RunDir(run_uri), stage, stage_folder)

    # ---- pure part --------------------------------------------------------------------

    def _forward(self, ids) -> None:
        self.decoder(input_ids=ids, use_cache=False)

    def token_texts(self, token_ids: np.ndarray) -> list[str]:
        new = [int(t) for t in np.unique(token_ids) if int(t) not in self._token_text]
        if new:
            for t, s in zip(new, self.tokenizer.batch_decode([[t] for t in new])):
                self._token_text[t] = s
        return [self._token_text[int(t)] for t in token_ids]

    def compute(self, doc_ids: Sequence[int], input_ids: Sequence[Sequence[int]],
                splits: Sequence[str] | None = None) -> Extracted:
        """Run the documents through the model; rows sorted by (doc_id, pos)."""
        import torch

        docs = [np.asarray(x, dtype=np.int64) for x in input_ids]
        lengths = [len(d) for d in docs]
        n_comp, n_neur = len(self.columns), len(self.neuron_columns)
        acts: dict[int, np.ndarray] = {}
        neurs: dict[int, np.ndarray] = {}
        with torch.inference_mode():
            for group in plan_forward_batches(lengths, self.batch_tokens):
                group = [i for i in group if lengths[i] > 0]
                if not group:
                    continue
                width = max(lengths[i] for i in group)
                ids = torch.zeros((len(group), width), dtype=torch.long)
                for r, i in enumerate(group):
                    ids[r, : lengths[i]] = torch.from_numpy(docs[i])
                ids = ids.to(self.device)
                # Right padding needs no attention mask: causal attention never lets a real
                # token see the padding after it.
                with self.capture.record("adapter"):
                    self._forward(ids)
                    a = torch.stack([self.capture.adapter[c] for c in self.columns], dim=-1) if n_comp else None
                a = a.float().cpu().numpy() if a is not None else np.zeros((len(group), width, 0), np.float32)
                if n_neur:
                    with self.model.disable_adapter(), self.capture.record("neurons"):
                        self._forward(ids)
                        nr = torch.cat([self.capture.neurons[l] for l in range(self.num_layers)], dim=-1)
                    nr = nr.float().cpu().numpy()
                for r, i in enumerate(group):
                    acts[i] = a[r, : lengths[i]]
                    if n_neur:
                        neurs[i] = nr[r, : lengths[i]]
        order = sorted(range(len(docs)), key=lambda i: int(doc_ids[i]))
        order = [i for i in order if lengths[i] > 0]
        doc_col = np.concatenate([np.full(lengths[i], int(doc_ids[i]), np.int64) for i in order]) if order else np.zeros(0, np.int64)
        pos_col = np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in order]) if order else np.zeros(0, np.int32)
        tok_col = np.concatenate([docs[i].astype(np.int32) for i in order]) if order else np.zeros(0, np.int32)
        A = np.concatenate([acts[i] for i in order]) if order else np.zeros((0, n_comp), np.float32)
        split_col = (np.concatenate([np.full(lengths[i], splits[i], dtype=object) for i in order])
                     if order and splits is not None else np.full(len(doc_col), "", dtype=object))
        base = {"doc_id": pa.array(doc_col), "pos": pa.array(pos_col)}
        tokens = pa.table({**base, "token_id": pa.array(tok_col), "token": pa.array(self.token_texts(tok_col), pa.string()),
                           "split": pa.array(split_col, pa.string())})
        At = np.ascontiguousarray(A.T, dtype=np.float32)
        activations = pa.table({**base, "token_id": pa.array(tok_col),
                                **{c: pa.array(At[j]) for j, c in enumerate(self.columns)}})
        neurons = None
        if n_neur:
            N = np.concatenate([neurs[i] for i in order]) if order else np.zeros((0, n_neur), np.float32)
            Nt = np.ascontiguousarray(N.T, dtype=np.float32)
            neurons = pa.table({**base, **{c: pa.array(Nt[j]) for j, c in enumerate(self.neuron_columns)}})
        return Extracted(tokens, activations, neurons)

    # ---- Ray Data entry point ------------------------------------------------------------

    def _tables(self) -> tuple[str, ...]:
        return TABLES if self.neuron_columns else ("activations", "tokens")

    def _done(self, name: str) -> int | None:
        """Rows of a batch already written in full (all its tables exist), else None."""
        st = self.stage
        if not all(st.exists(t, name) for t in self._tables()):
            return None
        with st.fs.open_input_file(st.path("tokens", name)) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def _die(self, when: str) -> None:
        c = self.crash
        if not c or c.get("when") != when:
            return
        try:
            fd = os.open(c["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(17)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.stage is None:
            raise ExtractError("Extractor was built without run_uri; call compute() instead")
        keep = [i for i, s in enumerate(batch["split"]) if s in self.splits]
        doc_ids = [int(batch["doc_id"][i]) for i in keep]
        summary = {"file": [""], "docs": [len(doc_ids)], "tokens": [0], "skipped": [False],
                   "first_doc": [min(doc_ids) if doc_ids else -1], "max_rss_mb": [0.0], "cpu_s": [0.0],
                   "pid": [os.getpid()]}
        if doc_ids:
            name = batch_name(doc_ids)
            summary["file"] = [name]
            done = self._done(name)
            if done is not None:
                summary["tokens"], summary["skipped"] = [done], [True]
            else:
                ex = self.compute(doc_ids, [batch["input_ids"][i] for i in keep], [str(batch["split"][i]) for i in keep])
                die = (lambda: self._die("before_rename")) if self.crash else None
                fs = self.stage.fs
                if ex.neurons is not None:
                    write_atomic(fs, self.stage.path("neurons", name), ex.neurons, self.compression)
                write_atomic(fs, self.stage.path("activations", name), ex.activations, self.compression)
                # tokens last: its presence marks the batch complete (see _done)
                write_atomic(fs, self.stage.path("tokens", name), ex.tokens, self.compression,
                             use_dictionary=["token", "split"], before_rename=die)
                self._die("after_write")
                summary["tokens"] = [ex.tokens.num_rows]
        summary["max_rss_mb"], summary["cpu_s"] = [max_rss_mb()], [cpu_seconds()]
        return {k: np.asarray(v) for k, v in summary.items()}


# --------------------------------------------------------------------------- the driver's part


@dataclass
class InputCount:
    docs: int
    tokens: int
    by_split: dict[str, int] = field(default_factory=dict)


def count_input(prepare: StageDir, splits: Sequence[str]) -> InputCount:
    """Documents and tokens of prepare/tokens in `splits` (from two small columns)."""
    import pyarrow.dataset as ds

    if not prepare.exists("tokens"):
        raise ExtractError(f"{prepare.uri_of('tokens')} does not exist: run the prepare stage first")
    d = ds.dataset(prepare.path("tokens"), filesystem=prepare.fs, format="parquet")
    t = d.to_table(columns=["split", "num_tokens"])
    by = {}
    for s, n in zip(t.column("split").to_pylist(), t.column("num_tokens").to_pylist()):
        by[s] = by.get(s, 0) + int(n)
    docs = sum(1 for s in t.column("split").to_pylist() if s in splits)
    tokens = sum(v for k, v in by.items() if k in splits)
    if docs == 0 or tokens == 0:
        raise ExtractError(
            f"the trace table {prepare.uri_of('tokens')} has no tokens in splits {list(splits)} "
            f"({t.num_rows} documents in all, tokens by split {by}): nothing to extract"
        )
    return InputCount(docs, tokens, by)


def finalize_batches(stage: StageDir, summaries: Sequence[dict], tables: Sequence[str]) -> tuple[list[str], int]:
    """The batch files the actors reported (their `file` column), each once, kept by
    `finalize_outputs`: returns them and how many leftovers were deleted."""
    files = [str(s["file"]) for s in summaries if s["file"]]
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        raise ExtractError(f"batches reported twice: {dup[:5]} (duplicate doc_ids in prepare/tokens?)")
    return files, finalize_outputs(stage, files, tables)


def finalize_outputs(stage: StageDir, files: Sequence[str], tables: Sequence[str]) -> int:
    """Keep exactly the reported batch files; delete leftovers (temporary files of killed
    writers, files of a batch split differently on a retry). Returns how many were deleted."""
    keep = set(files)
    deleted = 0
    for t in tables:
        infos = stage.fs.get_file_info(pafs.FileSelector(stage.path(t), allow_not_found=True))
        present = {i.base_name for i in infos if i.type == pafs.FileType.File}
        for name in sorted(present - keep):
            stage.fs.delete_file(stage.path(t, name))
            deleted += 1
        missing = sorted(keep - present)
        if missing:
            raise ExtractError(f"{stage.uri_of(t)}: reported batch files are missing: {missing[:5]}")
    return deleted


def check_columns(stage: StageDir, name: str, info: AdapterInfo, num_layers: int, n_neurons: int) -> None:
    """The written columns are the catalogue's (the actors saw the adapter the driver read)."""
    want = {
        "activations": ["doc_id", "pos", "token_id"] + [c.column for c in info.components],
        "neurons": ["doc_id", "pos"] + [c for c, _, _ in neuron_columns(num_layers, n_neurons)],
        "tokens": ["doc_id", "pos", "token_id", "token", "split"],
    }
    for t, cols in want.items():
        if t == "neurons" and not n_neurons:
            continue
        got = pq.read_schema(stage.path(t, name), filesystem=stage.fs).names
        if got != cols:
            extra, missing = sorted(set(got) - set(cols)), sorted(set(cols) - set(got))
            raise ExtractError(f"{stage.uri_of(t, name)}: columns differ from the catalogue "
                               f"(extra {extra[:5]}, missing {missing[:5]})")


def verify_exactly_once(stage: StageDir, expected_tokens: int, tables: Sequence[str]) -> dict[str, int]:
    """Each (doc_id, pos) exactly once in every table, and as many rows as input tokens."""
    from rank1_core import sql as S

    con = S.connect(None, memory_limit="2GB")
    out = {}
    for t in tables:
        files = S.matching_files(stage.run, stage.name, f"{t}/*.parquet")
        if not files:
            raise ExtractError(f"{stage.uri_of(t)} holds no Parquet file")
        S.register_view(con, t, stage.run, files)
        n, distinct = con.execute(f"SELECT count(*), count(DISTINCT (doc_id, pos)) FROM {t}").fetchone()
        if n != distinct or n != expected_tokens:
            raise ExtractError(
                f"{stage.uri_of(t)}: {n} rows, {distinct} distinct (doc_id, pos), expected {expected_tokens} "
                "each exactly once"
            )
        out[t] = int(n)
    con.close()
    return out
