"""The paper's prompts (Appendix B), the activation format they describe, the detection-scoring
prompt, and robust parsers for every answer.

- B.1 explanation + classification (0 clear / 1 broad but consistent / 2 polysemantic), JSON.
- B.2 category generation from a list of explanations, JSON; per-feature categorization,
  answered with a category ``string_id``.
- Detection scoring (beyond the paper): the explanation and a shuffled mix of held-out
  activating and non-activating excerpts; the model labels each excerpt 1 or 0.

Activations are shown as the paper's B.1 prompt describes: the full text of each context
first (on one line; newlines written as ``\\n``), then the tokens where the feature fired with
their strength on a 0-10 scale (10 = the feature's largest activation among the examples
shown), strongest first, one per line, e.g.::

    cat and mouse ran around the tree. They quickly
    tree 7.81
    ran 2.30

Parsers accept bare JSON, fenced JSON and JSON followed or preceded by other text; anything
else raises :class:`ParseError` with the reason, which the pipeline records on the feature.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from rank1_core.autointerp.clients import estimate_tokens


class ParseError(ValueError):
    """An answer that does not say what the prompt asked for; the message says why."""


# --------------------------------------------------------------------------- data


@dataclass
class Context:
    """One top-k context of a feature (a row of topk/contexts.parquet)."""

    rank: int
    doc_id: int
    pos: int
    value: float
    tokens: list[str]
    values: list[float]
    hit_index: int


@dataclass
class FeatureExamples:
    source: str
    feature: str
    sign: str
    contexts: list[Context] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{self.source}/{self.feature}/{self.sign}"


# --------------------------------------------------------------------------- formatting


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def show_token(tok: str) -> str:
    """A token as listed beside its activation: stripped, or quoted when only whitespace."""
    s = tok.strip()
    return _one_line(s) if s else json.dumps(tok)


def signed(values: Sequence[float], sign: str) -> list[float]:
    return [-float(v) for v in values] if sign == "neg" else [float(v) for v in values]


def scale_max(contexts: Sequence[Context], sign: str) -> float:
    """The largest activation (in the feature's sign) among the contexts: 10 on the scale."""
    best = 0.0
    for c in contexts:
        vals = signed(c.values, sign)
        if vals:
            best = max(best, max(vals))
    return best


def format_example(ctx: Context, sign: str, vmax: float, listed_tokens: int) -> str:
    """Full text on one line, then up to ``listed_tokens`` 'token strength' lines (0-10)."""
    lines = [_one_line("".join(ctx.tokens))]
    if vmax > 0:
        vals = signed(ctx.values, sign)
        order = sorted((i for i, v in enumerate(vals) if v > 0), key=lambda i: (-vals[i], i))
        for i in order[:listed_tokens]:
            strength = round(10.0 * vals[i] / vmax, 2)
            if strength <= 0:
                break
            lines.append(f"{show_token(ctx.tokens[i])} {strength:.2f}")
    return "\n".join(lines)


def format_activations(contexts: Sequence[Context], sign: str, listed_tokens: int) -> str:
    vmax = scale_max(contexts, sign)
    return "\n\n".join(format_example(c, sign, vmax, listed_tokens) for c in contexts)


# --------------------------------------------------------------------------- B.1


EXPLAIN_TEMPLATE = """\
We're studying neurons in a neural network. Each neuron looks for some particular \
thing in a short document. Look at the parts of the document where the neuron \
activates and describe what it's firing for.

Some activations will be noisy, in these cases you'll have to look for common \
phrases or concepts in the examples.

If a feature always activates for the same token, you should note this in your \
explanation, and also state whether that feature represents that token in some \
specific context. You may need to look at words surrounding activating tokens \
in order to understand why a feature is firing.

Features should have a clear, singular explanation and should be monosemantic. \
If there isn't a clear monosemantic explanation, note this.

Your explanation should not exceed ten words. Don't write complete sentences.

The neuron might be responding to:
- Individual tokens or specific words
- Phrases or expressions
- Abstract concepts or behaviors
- Broader context or topics

The activation format shows the full text first, then lists tokens where the neuron \
fired along with their activation strengths (0-10 scale). Higher values mean \
stronger activation.

For example:
cat and mouse ran around the tree. They quickly
tree 7.81
ran 2.30
around 1.01

Look at every example, and then generate an explanation. After generating an \
explanation, assess how monosemantic the feature is.

<neuron_activations>
{activations_str}
</neuron_activations>

Classify the feature's interpretability:
0: The feature is specific, clear, and monosemantic. All given examples clearly \
adhere to the explanation. The explanation is not broad, and the examples are not \
noisy. This feature has a clear and obvious interpretation.
1: The feature may be broad or noisy, but ALL given examples still adhere to the \
generated explanation. The explanation may not be obvious.
2: The feature appears polysemantic. Some examples do not clearly adhere to the \
generated explanation. The explanation does not cleanly explain the given examples.

Respond with JSON in exactly this format:
{{
  "explanation": "your concise explanation in just a few words",
  "classification": <0, 1, or 2>,
  "classification_reasoning": "brief justification for your classification"
}}
"""


def explain_schema(limits: bool = False) -> dict:
    """JSON schema of the B.1 answer. ``limits`` adds string lengths (small local models
    otherwise ramble until max_tokens; hosted strict modes may reject the keywords)."""
    s = {"type": "string"}
    expl = {**s, "maxLength": 80} if limits else s
    reason = {**s, "maxLength": 150} if limits else s
    return {"type": "object", "additionalProperties": False,
            "required": ["explanation", "classification", "classification_reasoning"],
            "properties": {"explanation": expl, "classification": {"type": "integer", "enum": [0, 1, 2]},
                           "classification_reasoning": reason}}


def explain_prompt(fx: FeatureExamples, n_contexts: int, listed_tokens: int, max_prompt_tokens: int) -> tuple[str, int]:
    """The B.1 prompt with as many of the first ``n_contexts`` contexts as fit the token
    budget (dropping from the weakest end; at least one). Returns (prompt, contexts used)."""
    ctxs = fx.contexts[:n_contexts]
    n = len(ctxs)
    while True:
        prompt = EXPLAIN_TEMPLATE.format(activations_str=format_activations(ctxs[:n], fx.sign, listed_tokens))
        if n <= 1 or estimate_tokens(prompt) <= max_prompt_tokens:
            return prompt, n
        # shrink proportionally to the overshoot, at least by one context
        over = estimate_tokens(prompt) / max_prompt_tokens
        n = max(1, min(n - 1, int(n / over)))


@dataclass
class Explanation:
    explanation: str
    classification: int | None
    reasoning: str
    note: str | None = None
    """Set when the explanation parsed but the classification did not."""


def parse_explanation(text: str) -> Explanation:
    obj = extract_json(text)
    if not isinstance(obj, dict):
        raise ParseError(f"expected a JSON object, got {type(obj).__name__}")
    expl = obj.get("explanation")
    if not isinstance(expl, str) or not expl.strip():
        raise ParseError(f"no 'explanation' string in {_snip(json.dumps(obj))}")
    reasoning = obj.get("classification_reasoning")
    reasoning = reasoning.strip() if isinstance(reasoning, str) else ""
    raw = obj.get("classification")
    cls: int | None = None
    if isinstance(raw, bool):
        raw = None
    if isinstance(raw, (int, float)) and float(raw) in (0.0, 1.0, 2.0):
        cls = int(raw)
    elif isinstance(raw, str) and raw.strip() in ("0", "1", "2"):
        cls = int(raw.strip())
    note = None if cls is not None else f"classification {raw!r} is not 0, 1 or 2"
    return Explanation(expl.strip(), cls, reasoning, note)


# --------------------------------------------------------------------------- answers that copy the prompt


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def copied_from(text: str, template: str, n: int = 4, share: float = 0.5) -> bool:
    """True when `text` is mostly the prompt's own wording: at least `share` of its word
    n-grams occur in `template`. A model too weak for the task fills the JSON answer with
    sentences of the instructions or the example's placeholders ("your concise explanation
    in just a few words") instead of describing the contexts. Text of fewer than `n` words
    is never flagged; pass the template without the examples, which an answer may quote."""
    w = _words(text)
    if len(w) < n:
        return False
    grams = _ngrams(template, n)
    mine = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return sum(g in grams for g in mine) / len(mine) >= share


@functools.lru_cache(maxsize=8)
def _ngrams(template: str, n: int) -> frozenset:
    t = _words(template)
    return frozenset(tuple(t[i:i + n]) for i in range(len(t) - n + 1))


# --------------------------------------------------------------------------- B.2


CATEGORIES_TEMPLATE = """\
You will be provided with a list of interpretations of MLP neurons from a \
large language model. Each interpretation describes what a particular learned \
feature detects or responds to during tasks.

Your task is to identify high-level functional role categories that capture what \
these features are doing computationally.

1. Read through all feature interpretations carefully
2. Identify natural groupings based on the computational or functional role each \
feature plays
3. Generate 5-8 high-level categories that capture the major functional roles

Important considerations:
- Focus on computational function (what role the feature plays) rather than \
surface-level similarity
- Categories should be mutually exclusive when possible, though some features \
may have dual roles
- Aim for categories that would generalize across different types of tasks
- Include 3-5 example feature interpretations for each category (copied exactly \
from the list provided)

Output your response as a JSON object with the following structure:
```json
{{
  "categories": [
    {{
      "string_id": "category_identifier_in_snake_case",
      "name": "Human Readable Category Name",
      "definition": "A 1-2 sentence description of what functional role these features serve.",
      "examples": [
        "exact feature interpretation from the list",
        "another feature interpretation from the list",
        "additional examples as needed"
      ]
    }}
  ],
  "summary": "Your overall categorization logic and any notable patterns you observed"
}}
```

Ensure your response contains ONLY the JSON object, with no additional text before or after.

Here are the feature interpretations to categorize:
{feature_list}
"""


def categories_schema(limits: bool = False) -> dict:
    s = {"type": "string"}

    def lim(n: int) -> dict:
        return {**s, "maxLength": n} if limits else s

    examples: dict[str, Any] = {"type": "array", "items": lim(80)}
    cats: dict[str, Any] = {"type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "required": ["string_id", "name", "definition", "examples"],
        "properties": {"string_id": ({"type": "string", "pattern": "^[a-z][a-z0-9_]{0,39}$"}
                                                 if limits else s),
                       "name": lim(60), "definition": lim(150), "examples": examples}}}
    if limits:
        examples.update(minItems=1, maxItems=3)
        cats.update(minItems=2, maxItems=8)
    return {"type": "object", "additionalProperties": False, "required": ["categories", "summary"],
            "properties": {"categories": cats, "summary": lim(300)}}


def categories_prompt(explanations: Sequence[str]) -> str:
    feature_list = "\n".join(f"{i}. {_one_line(e)}" for i, e in enumerate(explanations, 1))
    return CATEGORIES_TEMPLATE.format(feature_list=feature_list)


@dataclass
class Category:
    string_id: str
    name: str
    definition: str
    examples: list[str]


def snake_id(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")
    return s if s and s[0].isalpha() else f"c_{s}" if s else ""


def parse_categories(text: str) -> tuple[list[Category], str]:
    """(categories, summary) from a B.2 answer; ids normalised to snake_case and unique."""
    obj = extract_json(text)
    if isinstance(obj, list):
        obj = {"categories": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("categories"), list):
        raise ParseError("no 'categories' list in the answer")
    out: list[Category] = []
    seen: set[str] = set()
    for i, c in enumerate(obj["categories"]):
        if not isinstance(c, dict):
            raise ParseError(f"categories[{i}] is not an object")
        sid = snake_id(str(c.get("string_id") or c.get("name") or ""))
        if not sid:
            raise ParseError(f"categories[{i}] has no string_id or name")
        if sid in seen:
            continue
        seen.add(sid)
        ex = c.get("examples")
        out.append(Category(sid, str(c.get("name") or sid), str(c.get("definition") or ""),
                            [str(e) for e in ex] if isinstance(ex, list) else []))
    if not out:
        raise ParseError("the answer lists no categories")
    summary = obj.get("summary")
    return out, summary if isinstance(summary, str) else ""


CATEGORIZE_TEMPLATE = """\
Categorize this neural network feature into ONE of the given categories.

Feature explanation: "{explanation}"

Activation examples (showing what tokens/contexts activate this feature):
{examples_str}

Available categories:
{categories_str}

Based on the feature explanation and activation examples, which category best fits this feature?
Reply with ONLY the category string_id, nothing else.

Your response:"""


def categorize_schema(ids: Sequence[str]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["string_id"],
            "properties": {"string_id": {"type": "string", "enum": list(ids)}}}


def categories_str(categories: Sequence[Category]) -> str:
    return "\n".join(f"- {c.string_id}: {c.name}. {_one_line(c.definition)}".rstrip() for c in categories)


def categorize_prompt(explanation: str, fx: FeatureExamples, categories: Sequence[Category],
                      n_contexts: int, listed_tokens: int) -> str:
    return CATEGORIZE_TEMPLATE.format(
        explanation=_one_line(explanation),
        examples_str=format_activations(fx.contexts[:n_contexts], fx.sign, listed_tokens),
        categories_str=categories_str(categories))


def parse_category_choice(text: str, ids: Sequence[str]) -> str:
    """The category ``string_id`` an answer names: bare, quoted, in JSON, or inside a sentence."""
    idset = list(ids)
    candidates: list[str] = []
    try:
        obj = extract_json(text, allow_scalars=True)
    except ParseError:
        obj = None
    if isinstance(obj, dict):
        for k in ("string_id", "category", "id"):
            if isinstance(obj.get(k), str):
                candidates.append(obj[k])
    elif isinstance(obj, str):
        candidates.append(obj)
    first = text.strip().splitlines()[0] if text.strip() else ""
    candidates.append(first.strip().strip("`'\".:;,*- "))
    for cand in candidates:
        if cand in idset:
            return cand
        norm = snake_id(cand)
        if norm in idset:
            return norm
    hits = sorted(((m.start(), sid) for sid in idset
                   for m in [re.search(rf"(?<![a-z0-9_]){re.escape(sid)}(?![a-z0-9_])", text.lower())] if m))
    if hits:
        return hits[0][1]
    raise ParseError(f"answer {_snip(text)} names none of the categories {idset}")


# --------------------------------------------------------------------------- detection scoring


SCORE_TEMPLATE = """\
We're studying neurons in a neural network. Each neuron looks for some particular \
thing in a short document. A neuron has been explained as:

"{explanation}"

Below are {n} text excerpts. The neuron fires strongly somewhere in some of them and \
does not fire in the others. Using only the explanation, decide for each excerpt \
whether the neuron fires in it.

{excerpts}

Respond with JSON in exactly this format, with one label per excerpt in order \
(1 = the neuron fires, 0 = it does not):
{{"labels": [{example_labels}]}}
"""


def score_schema(n: int, limits: bool = False) -> dict:
    labels: dict[str, Any] = {"type": "array", "items": {"type": "integer", "enum": [0, 1]}}
    if limits:
        labels.update(minItems=n, maxItems=n)
    return {"type": "object", "additionalProperties": False, "required": ["labels"],
            "properties": {"labels": labels}}


def score_prompt(explanation: str, excerpts: Sequence[str]) -> str:
    body = "\n".join(f"Excerpt {i}: {_one_line(t)}" for i, t in enumerate(excerpts, 1))
    example = ", ".join("0 or 1" for _ in excerpts[:3]) + (", ..." if len(excerpts) > 3 else "")
    return SCORE_TEMPLATE.format(explanation=_one_line(explanation), n=len(excerpts), excerpts=body,
                                 example_labels=example)


def parse_labels(text: str, n: int) -> list[int]:
    obj = extract_json(text, allow_scalars=True)
    if isinstance(obj, dict):
        obj = obj.get("labels", obj.get("predictions"))
    if not isinstance(obj, list):
        raise ParseError(f"no 'labels' list in {_snip(text)}")
    labels = []
    for v in obj:
        if isinstance(v, bool) or v in (0, 1):
            labels.append(int(v))
        elif isinstance(v, str) and v.strip() in ("0", "1"):
            labels.append(int(v.strip()))
        else:
            raise ParseError(f"label {v!r} is not 0 or 1")
    if len(labels) != n:
        raise ParseError(f"{len(labels)} labels for {n} excerpts")
    return labels


def detection_scores(labels: Sequence[int], truth: Sequence[int]) -> tuple[float, float]:
    """(accuracy, balanced accuracy = mean of the true-positive and true-negative rates)."""
    if len(labels) != len(truth) or not truth:
        raise ValueError("labels and truth must be non-empty and of equal length")
    acc = sum(int(a == b) for a, b in zip(labels, truth)) / len(truth)
    rates = []
    for cls in (1, 0):
        idx = [i for i, t in enumerate(truth) if t == cls]
        if idx:
            rates.append(sum(int(labels[i] == cls) for i in idx) / len(idx))
    return acc, sum(rates) / len(rates)


# --------------------------------------------------------------------------- JSON extraction


def _snip(text: str, n: int = 120) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n] + "...")


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def extract_json(text: str, allow_scalars: bool = False) -> Any:
    """The JSON value in an answer: whole text, a fenced block, or the first decodable
    object/array inside other text (trailing text ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty answer")
    s = text.strip()
    try:
        obj = json.loads(s)
        if allow_scalars or isinstance(obj, (dict, list)):
            return obj
    except json.JSONDecodeError:
        pass
    for block in _FENCE.findall(s):
        try:
            return json.loads(block.strip())
        except json.JSONDecodeError:
            continue
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\{\[]", s):
        try:
            obj, _ = dec.raw_decode(s, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, (dict, list)):
            return obj
    raise ParseError(f"no JSON in answer {_snip(text)}")


EXPLAIN_INSTRUCTIONS = EXPLAIN_TEMPLATE.replace("{activations_str}", "")
"""The explanation prompt without its examples (for `copied_from`)."""
CATEGORIES_INSTRUCTIONS = CATEGORIES_TEMPLATE.replace("{feature_list}", "")
"""The category prompt without the explanations it lists (for `copied_from`)."""
