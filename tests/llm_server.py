"""A small LLM server for tests and benchmarks on 127.0.0.1: the OpenAI chat-completions and
the Anthropic messages protocols, deterministic answers, and faults injected on demand.

    with FakeLLMServer(api_key="sk-test-123") as srv:
        srv.faults.extend(["429", "500"])        # the next two requests fail
        srv.rules.append(("' Hmm'", "malformed", 99))  # prompts containing this: bad answers
        AsyncOpenAI(base_url=srv.openai_url, api_key="sk-test-123") ...
        AsyncAnthropic(base_url=srv.anthropic_url, api_key="sk-test-123") ...

Answers follow what the rank1 prompts ask (the server reads the prompt like a careful
model would): an explanation naming the most common strongest token of the examples,
categories, a category per feature, detection labels (1 where an excerpt holds the
explained token), fuzzing labels (1 where a marked token is it) and simulated activations
(10 on it, else 0; with ``logprobs`` requested, OpenAI-style token log-probabilities from
``LOGPROB_TOP``). Faults: '429' (with Retry-After), '500', 'slow' (reply after
``slow_s``), 'malformed' (prose instead of JSON), 'badbody' (a body that is not JSON),
'400', 'empty'.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import threading
import time

from aiohttp import web


def _top_tokens(prompt: str) -> list[str]:
    m = re.search(r"<neuron_activations>\n(.*?)\n</neuron_activations>", prompt, re.S)
    if not m:
        return []
    tops = []
    for block in m.group(1).split("\n\n"):
        lines = block.split("\n")
        if len(lines) >= 2:
            tops.append(lines[1].rsplit(" ", 1)[0])
    return tops


def answer_for(prompt: str, structured: bool) -> str:
    """What a well-behaved model answers to each rank1 prompt."""
    if "<neuron_activations>" in prompt:
        tops = _top_tokens(prompt)
        if not tops:
            return json.dumps({"explanation": "nothing", "classification": 2, "classification_reasoning": "no data"})
        tok, n = collections.Counter(tops).most_common(1)[0]
        cls = 0 if n == len(tops) else 1 if n * 2 >= len(tops) else 2
        obj = {"explanation": f"the token '{tok}'", "classification": cls,
               "classification_reasoning": f"{n} of {len(tops)} examples peak on it"}
        text = json.dumps(obj, indent=2)
        return text if structured else f"Looking at the examples:\n```json\n{text}\n```\nDone."
    if "Here are the feature interpretations to categorize" in prompt:
        items = re.findall(r"^\d+\. (.*)$", prompt.split("to categorize:", 1)[1], re.M)
        obj = {"categories": [
            {"string_id": "token_detectors", "name": "Token detectors",
             "definition": "Fire on one specific token.", "examples": items[:3]},
            {"string_id": "other_features", "name": "Other features",
             "definition": "Everything else.", "examples": items[3:5]}],
            "summary": f"{len(items)} interpretations, mostly single tokens"}
        text = json.dumps(obj)
        return text if structured else f"```json\n{text}\n```"
    if "Categorize this neural network feature" in prompt:
        expl = re.search(r'Feature explanation: "(.*)"', prompt).group(1)
        sid = "token_detectors" if "token" in expl else "other_features"
        return json.dumps({"string_id": sid}) if structured else sid
    if "marked <<like this>>" in prompt:  # fuzzing: 1 where a marked token is the explained one
        tok = _explained_token(prompt)
        excerpts = re.findall(r"^Excerpt \d+: (.*)$", prompt, re.M)
        return json.dumps({"labels": [int(any(tok == m.strip() for m in re.findall(r"<<(.*?)>>", e)))
                                      for e in excerpts]})
    if "predict how strongly the neuron fires" in prompt:  # simulation: 10 on the explained token
        tok = _explained_token(prompt)
        lists = [json.loads(m) for m in re.findall(r"^Excerpt \d+ \(\d+ tokens\): (.*)$", prompt, re.M)]
        return json.dumps({"activations": [[10 if t.strip() == tok else 0 for t in ts] for ts in lists]})
    if "text excerpts" in prompt:
        expl = re.search(r'explained as:\n\n"(.*)"', prompt).group(1)
        tok = re.search(r"'(.*)'", expl)
        tok = tok.group(1) if tok else "\x00"
        excerpts = re.findall(r"^Excerpt \d+: (.*)$", prompt, re.M)
        return json.dumps({"labels": [1 if tok in e else 0 for e in excerpts]})
    return "I do not know what you want."


def _explained_token(prompt: str) -> str:
    expl = re.search(r'explained as:\n\n"(.*)"', prompt).group(1)
    tok = re.search(r"'(.*)'", expl)
    return tok.group(1) if tok else "\x00"


LOGPROB_TOP = {"0": [["0", 0.7], ["1", 0.2], [",", 0.1]], "10": [["10", 0.7], ["9", 0.2], ["x", 0.1]]}
"""Alternatives the server offers at a predicted 0 or 10 (probabilities): expected values
(0*.7 + 1*.2) / .9 = 0.2222 and (10*.7 + 9*.2) / .9 = 9.7778 over the digit tokens."""


def logprobs_for(text: str) -> dict:
    """OpenAI's `choices[0].logprobs`: numbers one token each, other text in runs."""
    import math

    content = []
    for tok in re.findall(r"\d+|\D+", text):
        top = LOGPROB_TOP.get(tok, [[tok, 1.0]])
        alts = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
        content.append({"token": tok, "logprob": alts[0]["logprob"], "bytes": None, "top_logprobs": alts})
    return {"content": content, "refusal": None}


def parrot_answer(prompt: str, structured: bool) -> str:
    """What a model too small for the task answers (SmolLM2-135M does this): the JSON
    template of the prompt, placeholders and all."""
    if "<neuron_activations>" in prompt:
        return json.dumps({"explanation": "your concise explanation in just a few words", "classification": 0,
                           "classification_reasoning": "brief justification for your classification"})
    if "to categorize:" in prompt:
        return json.dumps({"categories": [
            {"string_id": "category_identifier_in_snake_case", "name": "Human Readable Category Name",
             "definition": "A 1-2 sentence description of what functional role these features serve.",
             "examples": ["exact feature interpretation from the list"]},
            {"string_id": "token_detectors", "name": "Token detectors", "definition": "One token.", "examples": []}],
            "summary": "Your overall categorization logic and any notable patterns you observed"})
    return answer_for(prompt, structured)


class FakeLLMServer:
    def __init__(self, api_key: str | None = None, *, slow_s: float = 2.0, retry_after: str = "0.05",
                 rate_429: float = 0.0, seed: int = 0, delay_s: float = 0.0) -> None:
        self.api_key = api_key
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.rate_429 = rate_429
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.faults: collections.deque[str] = collections.deque()
        self.rules: list[list] = []  # [substring, fault, remaining count]
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- addresses
    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- bookkeeping
    def answered(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 200 and r["fault"] in (None, "malformed", "slow")]

    def _fault_for(self, prompt: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule[0] in prompt and rule[2] > 0:
                    rule[2] -= 1
                    return rule[1]
            if self.faults:
                return self.faults.popleft()
            if self.rate_429 and self.rng.random() < self.rate_429:
                return "429"
        return None

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        bearer = request.headers.get("Authorization", "")
        return bearer == f"Bearer {self.api_key}" or request.headers.get("x-api-key") == self.api_key

    # ---- protocol
    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        t = time.time()
        body = await request.json()
        if kind == "openai":
            prompt = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
            structured = "response_format" in body
        else:
            prompt = "\n".join(m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                               for m in body["messages"])
            structured = "output_config" in body
        rec = {"time": t, "kind": kind, "model": body.get("model"), "prompt": prompt, "body": body,
               "fault": None, "status": 200}
        with self.lock:
            self.requests.append(rec)
        if not self._authorized(request):
            rec["status"] = 401
            shown = (self.api_key[:5] + "***" + self.api_key[-4:]) if self.api_key else ""
            return self._error(kind, 401, f"Incorrect API key provided: {request.headers.get('Authorization', '')[7:12]}"
                               f"***. Expected {shown}", "authentication_error")
        fault = self._fault_for(prompt)
        rec["fault"] = fault
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fault == "429":
            rec["status"] = 429
            return self._error(kind, 429, "Rate limit reached", "rate_limit_error",
                               headers={"Retry-After": self.retry_after})
        if fault == "500":
            rec["status"] = 500
            return self._error(kind, 500, "The server had an error", "api_error")
        if fault == "400":
            rec["status"] = 400
            return self._error(kind, 400, "Invalid request: bad parameter", "invalid_request_error")
        if fault == "badbody":
            return web.Response(text="{not json at all", content_type="application/json")
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "malformed":
            text = "Well, this neuron seems to like many things; hard to say."
        elif fault == "parrot":
            text = parrot_answer(prompt, structured)
        elif fault == "empty":
            text = ""
        else:
            text = answer_for(prompt, structured)
        tin, tout = max(1, len(prompt) // 4), max(1, len(text) // 4)
        if kind == "openai":
            return web.json_response({
                "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(t),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop",
                             "logprobs": logprobs_for(text) if body.get("logprobs") else None}],
                "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}})
        return web.json_response({
            "id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": text}] if text else [], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": tin, "output_tokens": tout}})

    @staticmethod
    def _error(kind, status, message, etype, headers=None):
        if kind == "openai":
            payload = {"error": {"message": message, "type": etype, "code": None}}
        else:
            payload = {"type": "error", "error": {"type": etype, "message": message}}
        return web.json_response(payload, status=status, headers=headers or {})

    # ---- lifecycle
    def start(self) -> "FakeLLMServer":
        ready = threading.Event()

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            async def openai_chat(request):
                return await self._handle(request, "openai")

            async def anthropic_messages(request):
                return await self._handle(request, "anthropic")

            app.router.add_post("/v1/chat/completions", openai_chat)
            app.router.add_post("/v1/messages", anthropic_messages)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port or 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake LLM server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
