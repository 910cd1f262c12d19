"""s1-style chat formatting, tokenization and the assistant-only loss mask (and, for chat
rows, `tokenize_chat`: every assistant turn of a multi-turn conversation).

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
    offsets: list[tuple[int, int]] | None = None
    """With `offsets=True`: each assistant token's (start, end) characters in `assistant_text`
    (the tokenizer's offset mapping; token `i` of it is position `prompt_len + i`)."""


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


def field_offsets(thinking: str, attempt: str, model: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Where each field's text lies in `assistant_text`: {"thinking" | "attempt": (shift, start,
    end)}; character `c` of the raw field is character `c + shift` of the assistant text when
    `start <= c + shift < end` (outside: the whitespace `strip()` removed)."""
    out = {}
    at = 0
    for name, text, marker in (("thinking", thinking, model.think_marker), ("attempt", attempt, model.answer_marker)):
        at += len(marker) + 1
        lead = len(text) - len(text.lstrip())
        body = len(text.strip())
        out[name] = (at - lead, at, at + body)
        at += body + 1
    return out


def char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The tokens [first, last + 1) whose characters overlap [start, end); None when none do."""
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (hit[0], hit[-1] + 1) if hit else None


def tokenize_trace(tokenizer, question: str, thinking: str, attempt: str, model: ModelConfig,
                   max_len: int, overlong: str = "truncate", offsets: bool = False) -> Tokenized | None:
    """Token ids and loss mask of one trace; None when `overlong == "drop"` and it is too long.
    `offsets=True` (a fast tokenizer) also returns the assistant tokens' character offsets."""
    prompt = tokenizer.apply_chat_template(prompt_messages(question, model), tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    enc = tokenizer(assistant_text(thinking, attempt, model, tokenizer.eos_token), add_special_tokens=False,
                    return_offsets_mapping=offsets)
    a_ids = enc["input_ids"]
    ids = p_ids + a_ids
    mask = [0] * len(p_ids) + [1] * len(a_ids)
    truncated = len(ids) > max_len
    if truncated:
        if overlong == "drop" or len(p_ids) >= max_len:
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    offs = [tuple(o) for o in enc["offset_mapping"]][: len(ids) - len(p_ids)] if offsets else None
    return Tokenized(ids, mask, len(p_ids), truncated, offs)


def chat_segments(tokenizer, messages: list[dict], model: ModelConfig) -> list[tuple[str, int]]:
    """The conversation rendered by the model's chat template, cut into (text, is_assistant)
    pieces: each assistant turn's content through its closing eos token is one piece with
    flag 1 (its header `<|im_start|>assistant\\n` and what follows the eos are 0).

    The template is rendered once per assistant turn (the conversation up to it with the
    generation prompt, then including it); each rendering must extend the previous one, as
    ChatML templates (Qwen, SmolLM2) do, else a DataError says so."""
    from rank1_core.data.io import DataError

    msgs = list(messages)
    if model.system_prompt is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": model.system_prompt})

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)

    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, int]] = []
    so_far = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head, full = render(i, True), render(i + 1, False)
        if not (head.startswith(so_far) and full.startswith(head)):
            raise DataError("the model's chat template does not render this conversation turn by turn "
                            f"(message {i} changes the text before it); use a ChatML-style template")
        body = full[len(head):]
        cut = body.rfind(eos) + len(eos) if eos and eos in body else len(body)
        pieces += [(head[len(so_far):], 0), (body[:cut], 1)]
        so_far = head + body[:cut]
    tail = render(len(msgs), False)
    if not tail.startswith(so_far):
        raise DataError("the model's chat template does not render this conversation turn by turn")
    pieces.append((tail[len(so_far):], 0))
    return [(t, f) for t, f in pieces if t]


def tokenize_chat(tokenizer, messages: list[dict], model: ModelConfig, max_len: int,
                  overlong: str = "truncate") -> Tokenized | None:
    """Token ids and loss mask of a chat conversation: 1 on exactly the assistant turns (each
    turn's content and closing eos). Each piece is tokenized on its own and the ids
    concatenated, so the boundaries are exact. `prompt_len`: tokens before the first
    assistant token. None when `overlong == "drop"` and it is too long."""
    ids: list[int] = []
    mask: list[int] = []
    for text, flag in chat_segments(tokenizer, messages, model):
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [flag] * len(part)
    prompt_len = mask.index(1)
    truncated = len(ids) > max_len
    if truncated:
        if overlong == "drop" or prompt_len >= max_len:
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    return Tokenized(ids, mask, prompt_len, truncated)
