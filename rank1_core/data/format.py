"""s1-style chat formatting, tokenization and the assistant-only loss mask.

A trace becomes

    <chat template: system + user question + assistant header>
    <|im_start|>think\\n{thinking}\\n<|im_start|>answer\\n{attempt}<|im_end|>

The prompt part (everything up to and including the assistant header) has loss mask 0;
the assistant part, sentinels and closing eos included, has mask 1. The two parts are
tokenized separately and concatenated, so the mask boundary is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from rank1_core.config import ModelConfig


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    truncated: bool


def prompt_messages(question: str, model: ModelConfig) -> list[dict]:
    msgs = []
    if model.system_prompt is not None:
        msgs.append({"role": "system", "content": model.system_prompt})
    msgs.append({"role": "user", "content": question})
    return msgs


def prompt_text(tokenizer, question: str, model: ModelConfig, *, think: bool = True) -> str:
    """The generation prompt: chat template + assistant header (+ the think sentinel)."""
    text = tokenizer.apply_chat_template(prompt_messages(question, model), tokenize=False,
                                         add_generation_prompt=True)
    return text + (f"{model.think_marker}\n" if think else "")


def assistant_text(thinking: str, attempt: str, model: ModelConfig, eos: str) -> str:
    return f"{model.think_marker}\n{thinking.strip()}\n{model.answer_marker}\n{attempt.strip()}{eos}"


def tokenize_trace(tokenizer, question: str, thinking: str, attempt: str, model: ModelConfig,
                   max_len: int, overlong: str = "truncate") -> Tokenized | None:
    """Token ids and loss mask of one trace; None when `overlong == "drop"` and it is too long."""
    prompt = tokenizer.apply_chat_template(prompt_messages(question, model), tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(assistant_text(thinking, attempt, model, tokenizer.eos_token),
                      add_special_tokens=False)["input_ids"]
    ids = p_ids + a_ids
    mask = [0] * len(p_ids) + [1] * len(a_ids)
    truncated = len(ids) > max_len
    if truncated:
        if overlong == "drop" or len(p_ids) >= max_len:
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    return Tokenized(ids, mask, len(p_ids), truncated)
