"""One async interface over the LLM backends: the official ``openai`` SDK (OpenAI, or any
OpenAI-compatible server through a base URL, e.g. vLLM) and the official ``anthropic`` SDK.

    client = make_client(endpoint, api_key=Secret.from_env("OPENAI_API_KEY"))
    resp = await client.complete(request)   # LLMResponse(text, tokens_in, tokens_out, ...)

Clients never retry (the SDKs' own retries are off: :mod:`retry` owns that policy); they map
the SDK's errors onto :class:`~rank1_core.autointerp.retry.TransientError` (429, 5xx,
408/409, timeouts, dropped connections; with Retry-After) or :class:`PermanentError`
(anything else). Error texts are scrubbed of the API key before they leave this module.

Structured output: with ``structured`` on, a request's JSON schema goes to the server as
``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM) or
``output_config={"format": {"type": "json_schema", ...}}`` (Anthropic); the parsers accept
free text as well, so a backend without it still works.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from rank1_core.autointerp.retry import TransientError, parse_retry_after


class PermanentError(Exception):
    """A request that retrying cannot fix (bad request, auth, unknown model, empty answer)."""


class Secret:
    """An API key that never shows itself in a repr, str, log line or f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @classmethod
    def from_env(cls, name: str | None) -> "Secret | None":
        value = os.environ.get(name) if name else None
        return cls(value) if value else None

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __reduce__(self):  # pickled for Ray actors only; never printed
        return (Secret, (self._value,))


_KEY_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_\-\*\.]{6,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.\*]{6,}"),
    re.compile(r"(?i)(x-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]{6,}"),
]


def redact(text: str, *secrets: "Secret | str | None") -> str:
    """``text`` with every given secret and anything shaped like an API key replaced by ***."""
    for s in secrets:
        value = s.reveal() if isinstance(s, Secret) else s
        if value:
            text = text.replace(value, "***")
            if len(value) > 12:  # servers echo keys partly masked: 'sk-ab...wxyz'
                text = text.replace(value[:8], "***").replace(value[-6:], "***")
    for pat in _KEY_PATTERNS:
        text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


@dataclass(frozen=True)
class Endpoint:
    """Where and how one configured model is reached (everything but the key itself)."""

    name: str
    """Name used in task routing, limits, prices and logs."""
    provider: str = "openai"
    """'openai' (OpenAI or any OpenAI-compatible server) or 'anthropic'."""
    model: str = ""
    """Model id sent to the provider."""
    base_url: str | None = None
    api_key_env: str | None = None
    structured: bool = True
    temperature: float | None = None
    extra_output_tokens: int = 0
    """Added to every request's output budget (reasoning models spend tokens before answering)."""
    params: dict = field(default_factory=dict)
    """Extra provider parameters sent with every request (e.g. reasoning_effort)."""
    timeout_s: float = 120.0


@dataclass(frozen=True)
class LLMRequest:
    """One prompt for one task. ``tag`` (e.g. 'adapter/L03_gate_proj/pos') is bookkeeping only."""

    task: str
    model: str
    """Endpoint name (config), not the provider's id."""
    prompt: str
    max_tokens: int
    schema: dict | None = None
    system: str | None = None
    tag: str = ""
    origin: str = ""
    """The stage attempt that asks (its call-log id): a paid answer's cache entry names it, so a
    resumed stage can count what a killed attempt paid for but never logged."""
    check: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)
    """The task's parser: an answer it rejects is returned, but never served from the cache."""
    top_logprobs: int = 0
    """Ask for this many alternatives' log-probabilities per generated token (OpenAI-compatible
    servers only; the simulation scorer's expected values). 0: none."""


@dataclass
class LLMResponse:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str | None = None
    model: str | None = None
    logprobs: list | None = None
    """Per generated token {"token": str, "top": [[token, logprob], ...]} when asked for."""


def estimate_tokens(text: str) -> int:
    """A deliberately high guess of a prompt's tokens without the model's tokenizer
    (English BPE averages ~4 bytes a token; this assumes 3)."""
    return len(text.encode()) // 3 + 16


def cache_payload(endpoint: Endpoint, req: LLMRequest) -> dict:
    """What a cached answer depends on: provider, model, parameters, schema and prompt."""
    return {
        "provider": endpoint.provider, "model": endpoint.model,
        "max_tokens": req.max_tokens + endpoint.extra_output_tokens,
        "temperature": endpoint.temperature, "params": endpoint.params,
        "schema": req.schema if endpoint.structured else None,
        "system": req.system, "prompt": req.prompt,
        **({"top_logprobs": req.top_logprobs} if req.top_logprobs else {}),
    }


class LLMClient(Protocol):
    endpoint: Endpoint

    async def complete(self, req: LLMRequest) -> LLMResponse: ...

    async def close(self) -> None: ...


def _transient_status(status: int) -> bool:
    return status in (408, 409, 425, 429) or status >= 500


class OpenAIClient:
    """Chat completions through ``openai.AsyncOpenAI`` (any base URL)."""

    def __init__(self, endpoint: Endpoint, api_key: Secret | None) -> None:
        import openai

        self.endpoint = endpoint
        self._key = api_key
        self._openai = openai
        self.client = openai.AsyncOpenAI(
            api_key=api_key.reveal() if api_key else "no-key", base_url=endpoint.base_url,
            timeout=endpoint.timeout_s, max_retries=0)

    async def complete(self, req: LLMRequest) -> LLMResponse:
        ep, openai = self.endpoint, self._openai
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": req.prompt}]
        kw: dict[str, Any] = {"model": ep.model, "messages": messages,
                              "max_completion_tokens": req.max_tokens + ep.extra_output_tokens}
        if ep.temperature is not None:
            kw["temperature"] = ep.temperature
        if req.schema is not None and ep.structured:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": req.task, "schema": req.schema, "strict": True}}
        if req.top_logprobs:
            kw.update(logprobs=True, top_logprobs=req.top_logprobs)
        kw.update(ep.params)
        try:
            r = await self.client.chat.completions.create(**kw)
        except openai.APITimeoutError as e:
            raise TransientError(f"timeout after {ep.timeout_s:g}s ({type(e).__name__})",
                                 timed_out=True) from None
        except openai.APIConnectionError as e:
            raise TransientError(redact(f"connection error: {e}", self._key)) from None
        except openai.APIStatusError as e:
            msg = redact(f"HTTP {e.status_code}: {e.message}", self._key)
            if _transient_status(e.status_code):
                raise TransientError(msg, status=e.status_code,
                                     retry_after=parse_retry_after(dict(e.response.headers))) from None
            raise PermanentError(msg) from None
        except openai.OpenAIError as e:  # malformed reply bodies and the like
            raise PermanentError(redact(f"{type(e).__name__}: {e}", self._key)) from None
        if not r.choices:
            raise PermanentError("reply has no choices")
        choice = r.choices[0]
        text = choice.message.content
        if text is None:
            refusal = getattr(choice.message, "refusal", None)
            raise PermanentError(f"no text in reply (finish_reason={choice.finish_reason!r}"
                                 + (f", refusal={refusal!r}" if refusal else "") + ")")
        usage = r.usage
        return LLMResponse(
            text=text,
            tokens_in=usage.prompt_tokens if usage else estimate_tokens(req.prompt),
            tokens_out=usage.completion_tokens if usage else estimate_tokens(text),
            finish_reason=choice.finish_reason, model=r.model, logprobs=_logprobs(choice))

    async def close(self) -> None:
        await self.client.close()


def _logprobs(choice) -> list | None:
    """The choice's token log-probabilities as plain lists (None when not returned)."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [{"token": c.token, "top": [[a.token, a.logprob] for a in (c.top_logprobs or [])]} for c in content]


class AnthropicClient:
    """Messages through ``anthropic.AsyncAnthropic`` (any base URL speaking the protocol)."""

    def __init__(self, endpoint: Endpoint, api_key: Secret | None) -> None:
        import anthropic

        self.endpoint = endpoint
        self._key = api_key
        self._anthropic = anthropic
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key.reveal() if api_key else "no-key", base_url=endpoint.base_url,
            timeout=endpoint.timeout_s, max_retries=0)

    async def complete(self, req: LLMRequest) -> LLMResponse:
        ep, anthropic = self.endpoint, self._anthropic
        kw: dict[str, Any] = {"model": ep.model, "max_tokens": req.max_tokens + ep.extra_output_tokens,
                              "messages": [{"role": "user", "content": req.prompt}]}
        if req.system:
            kw["system"] = req.system
        if ep.temperature is not None:
            kw["temperature"] = ep.temperature
        if req.schema is not None and ep.structured:
            kw["output_config"] = {"format": {"type": "json_schema", "schema": req.schema}}
        kw.update(ep.params)
        try:
            r = await self.client.messages.create(**kw)
        except anthropic.APITimeoutError as e:
            raise TransientError(f"timeout after {ep.timeout_s:g}s ({type(e).__name__})",
                                 timed_out=True) from None
        except anthropic.APIConnectionError as e:
            raise TransientError(redact(f"connection error: {e}", self._key)) from None
        except anthropic.APIStatusError as e:
            msg = redact(f"HTTP {e.status_code}: {e.message}", self._key)
            if _transient_status(e.status_code):
                raise TransientError(msg, status=e.status_code,
                                     retry_after=parse_retry_after(dict(e.response.headers))) from None
            raise PermanentError(msg) from None
        except anthropic.AnthropicError as e:
            raise PermanentError(redact(f"{type(e).__name__}: {e}", self._key)) from None
        text = "".join(getattr(b, "text", "") for b in r.content if getattr(b, "type", None) == "text")
        if not text:
            raise PermanentError(f"no text in reply (stop_reason={r.stop_reason!r})")
        return LLMResponse(text=text, tokens_in=r.usage.input_tokens, tokens_out=r.usage.output_tokens,
                           finish_reason=r.stop_reason, model=r.model)

    async def close(self) -> None:
        await self.client.close()


def make_client(endpoint: Endpoint, api_key: Secret | None) -> LLMClient:
    if endpoint.provider == "openai":
        return OpenAIClient(endpoint, api_key)
    if endpoint.provider == "anthropic":
        return AnthropicClient(endpoint, api_key)
    raise ValueError(f"unknown provider {endpoint.provider!r} (openai, anthropic)")
