"""Model resolution and loading: built-ins offline, local dirs, hub ids, adapters, tokenizers."""

import json

import pytest
import torch

from rank1_core.config import ModelConfig, TinyModelConfig
from rank1_core.models import (ModelNotAvailable, QWEN_SPECIAL_START, load_model, load_tokenizer, meta_model,
                               qwen_tokenizer, resolve_model_dir)


def test_qwen_tokenizer_has_the_real_vocabulary():
    tok = qwen_tokenizer()
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids("<|im_start|>") == QWEN_SPECIAL_START + 1
    assert tok.convert_tokens_to_ids("<|im_end|>") == QWEN_SPECIAL_START + 2
    # known Qwen2.5 ids: "Hello" 9707, " world" 1879; digits split one by one
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("123")["input_ids"] == [16, 17, 18]


def test_tiny_model_dir_roundtrips_through_autotokenizer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    text = "Wait, 3 + 4 = 7. <|im_start|>answer\nThe answer is 7.<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2


def test_tiny_llama_and_cache_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_CACHE", str(tmp_path))
    cfg = ModelConfig(name="tiny-llama", tiny=TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64,
                                                             num_heads=2, num_kv_heads=1))
    d = resolve_model_dir(cfg)
    assert d.parent == tmp_path / "models"
    assert resolve_model_dir(cfg) == d  # built once
    m = load_model(d)
    assert m.config.model_type == "llama"
    out = m(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 151665)


def test_local_dir_and_bad_names(tmp_path, tiny_model_dir):
    assert resolve_model_dir(ModelConfig(name=str(tiny_model_dir))) == tiny_model_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="has no config.json"):
        resolve_model_dir(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(ModelNotAvailable, match="neither a built-in"):
        resolve_model_dir(ModelConfig(name="./does/not/exist"))


def test_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="huggingface-cli download someone/not-here"):
        resolve_model_dir(ModelConfig(name="someone/not-here"))


def test_adapter_on_top(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir)
    pm = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    pm.save_pretrained(tmp_path / "adapter")
    x = torch.tensor([[5, 6, 7]])
    expected = pm(x).logits
    loaded = load_model(tiny_model_dir, adapter=tmp_path / "adapter")
    torch.testing.assert_close(loaded(x).logits, expected)
    with pytest.raises(ModelNotAvailable, match="not a peft adapter"):
        load_model(tiny_model_dir, adapter=tmp_path)


def test_meta_model_costs_nothing():
    m = meta_model(ModelConfig(name="Qwen/Qwen2.5-32B-Instruct"))
    p = next(m.parameters())
    assert p.device.type == "meta"
    assert m.config.num_hidden_layers == 64


@pytest.mark.slow
def test_smollm2_from_gguf_matches_saved_dir():
    """The cached model dir reproduces the GGUF model's logits exactly."""
    from transformers import AutoModelForCausalLM

    from rank1_core.models import smollm2_gguf

    d = resolve_model_dir(ModelConfig())
    tok = load_tokenizer(d)
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    mine = load_model(d)
    x = tok("Wait, let me double-check: 3 + 4 = 7.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(mine(x).logits, ref(x).logits, rtol=0, atol=0)
    assert mine.config.num_hidden_layers == 30
