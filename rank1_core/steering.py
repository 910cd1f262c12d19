"""Steering: push one adapter direction while the model generates and measure what changes.

With a rank-1 LoRA every component `L{layer:02d}_{module}` adds `lora_B(lora_A(x)) * scaling`
and `s = lora_A(x)` is one scalar per token; the vector of all components' scalars is the
*adapter state*. A steering condition rewrites that state token by token with one affine map
per component, applied by a forward hook on the component's `lora_A`:

    s_c  <-  scale_c * s_c + shift_c        (at the steered positions only)

Targets and modes (alpha is the swept strength; `typical` is defined below):

- component, mode `scale`: scale = alpha for the target. alpha 1 = unsteered, 0 = ablated
  (the same as zeroing lora_A), -1 flips the sign, 100 = a hundred times its own value.
- component, mode `set`: scale 0, shift = alpha * typical (alpha 0 = ablated).
- component, mode `add`: shift = alpha * typical (alpha 0 = unsteered).
- SAE feature (always `add`): shift = alpha * mean_act * d, where d is the feature's decoder
  row mapped back to the adapter state (`W_dec[f] * norm_scale`: the un-normalised change of
  the reconstruction per unit of the feature), added to every component at once. Scaling or
  setting an SAE feature is not causal: its value needs the whole state, i.e. components of
  later layers, before the first layer runs.
- random control: shift = m * u for a random unit direction u of the adapter state (one per
  seed, shared by every target), with m the RMS over tokens of the target's perturbation
  norm at that alpha, so a random condition pushes the state exactly as far as its target
  does: component scale m = (alpha - 1) * rms; set m = sqrt((alpha * rms - mean)^2 + std^2);
  add m = alpha * rms; SAE m = alpha * mean_act * |d|. (For add and SAE the norms are equal
  at every token; for scale and set, whose perturbation follows the component's own value
  token by token, they are equal in RMS.)

`typical`: a component's RMS over every token of the run, sqrt(mean^2 + std^2) from
`topk/stats.parquet` (the magnitude of its typical activation, offset included); an SAE
feature's mean activation over the tokens where it fires (`sae/latents.parquet`), since its
value over all tokens is mostly zero.

Positions: `after` None steers every token (the prompt too); `after` k steers the tokens at
least k positions after the end of the prompt (0: every generated token). Prompts are
left-padded to a common width, so a position is steered when its index in the padded row is
>= width + k; a pre-hook on the decoder tracks the index through the KV cache.

Measures (per condition over the benchmark prompts, greedy decoding): hesitation words per
100 generated tokens, response length, accuracy (`grading.grade`), and the KL from the
unsteered model, KL(steered || unsteered) of the next-token distributions teacher-forced on
the *unsteered* model's own response to the same prompt, averaged over the response tokens
predicted from steered positions.

No `ray` here: `ray_jobs/steer.py` runs `SteerWorker` as Ray actors; tests call it directly.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from rank1_core.ablation import hooked_modules, lora_components
from rank1_core.config import ConfigError
from rank1_core.lexicon import count_words, word_pattern, word_start_pattern
from rank1_core.lora import canonical, component_name, parse_component  # noqa: F401
from rank1_core.lora import component_sort_key as component_order  # noqa: F401
from rank1_core.models import decoder as _find_decoder
from rank1_core.rundir import atomic_local_path

MODES = ("scale", "set", "add")
KINDS = ("component", "sae", "random", "none")
SAMPLE_COLUMNS = ["condition", "benchmark", "problem_id", "response", "n_tokens", "finished", "correct",
                  "marker_found", "hesitations", "kl_sum", "kl_max", "kl_tokens", "identical", "token_ids"]


class SteerError(ConfigError):
    """A steering target or input is wrong (unknown component, dead feature, missing stage);
    the message names which and what exists."""


# --------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One steering condition: an affine map of some components' lora_A outputs."""

    id: str
    """Unique name, e.g. `L03_gate_proj|scale|10`, `random:1|L03_gate_proj|scale|10`, `unsteered`."""
    target: str
    """The steered feature (component or SAE feature name); a random control names the feature
    it controls for; `none` for the unsteered model."""
    target_kind: str
    """component | sae | random | none."""
    source: Optional[str]
    """Dashboard source of the target: adapter | sae (None: unsteered)."""
    mode: str
    """scale | set | add (SAE features and random directions: add); none."""
    alpha: float
    seed: Optional[int] = None
    """Random direction's seed (random controls only)."""
    scale: dict[str, float] = field(default_factory=dict)
    """component -> factor on its lora_A output (absent: 1)."""
    shift: dict[str, float] = field(default_factory=dict)
    """component -> value added to its lora_A output (absent: 0)."""
    after: Optional[int] = None
    """Steer positions >= prompt end + after; None: every position."""
    typical: float = float("nan")
    """The target's typical activation (component RMS; SAE mean activation when firing)."""
    perturbation_rms: float = 0.0
    """RMS over tokens of the norm of the change of the adapter state."""

    @property
    def identity(self) -> bool:
        return all(v == 1.0 for v in self.scale.values()) and all(v == 0.0 for v in self.shift.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Condition":
        return cls(**d)


def unsteered(after: Optional[int] = None) -> Condition:
    return Condition("unsteered", "none", "none", None, "none", float("nan"), after=after)


@dataclass(frozen=True)
class ComponentStats:
    """A component's activation over every token (topk/stats.parquet)."""

    mean: float
    std: float

    @property
    def rms(self) -> float:
        return math.sqrt(self.mean ** 2 + self.std ** 2)


def _fmt(alpha: float) -> str:
    return f"{alpha:g}"


def component_condition(name: str, mode: str, alpha: float, stats: ComponentStats,
                        after: Optional[int] = None) -> Condition:
    """Steer one component (`scale`, `set` or `add`, see the module docstring)."""
    name = canonical(name)
    rms = stats.rms
    if mode == "scale":
        scale, shift, pert = {name: float(alpha)}, {}, abs(alpha - 1.0) * rms
    elif mode == "set":
        scale, shift = {name: 0.0}, {name: float(alpha) * rms}
        pert = math.sqrt((alpha * rms - stats.mean) ** 2 + stats.std ** 2)
    elif mode == "add":
        scale, shift, pert = {}, {name: float(alpha) * rms}, abs(alpha) * rms
    else:
        raise ValueError(f"unknown steering mode {mode!r} (known: {', '.join(MODES)})")
    return Condition(f"{name}|{mode}|{_fmt(alpha)}", name, "component", "adapter", mode, float(alpha),
                     scale=scale, shift=shift, after=after, typical=rms, perturbation_rms=pert)


def component_magnitude(mode: str, alpha: float, stats: ComponentStats) -> float:
    """Signed size m of the random control matching a component's steering (module docstring)."""
    rms = stats.rms
    if mode == "scale":
        return (alpha - 1.0) * rms
    if mode == "set":
        d = alpha * rms - stats.mean
        return math.copysign(math.sqrt(d * d + stats.std ** 2), d)
    if mode == "add":
        return alpha * rms
    raise ValueError(f"unknown steering mode {mode!r} (known: {', '.join(MODES)})")


def sae_direction(sae, feature: int) -> dict[str, float]:
    """The feature's decoder row mapped back to the raw adapter state: W_dec[f] * norm_scale
    (the change of the SAE's reconstruction per unit of the feature), keyed by component."""
    if not 0 <= feature < sae.d_sae:
        raise SteerError(f"SAE feature {feature} does not exist (the SAE has {sae.d_sae} latents)")
    row = (sae.W_dec[feature].detach().double() * sae.norm_scale.detach().double()).numpy()
    return {canonical(c): float(v) for c, v in zip(sae.columns, row)}


def sae_condition(feature_name: str, direction: dict[str, float], alpha: float, mean_act: float,
                  after: Optional[int] = None) -> Condition:
    """Add alpha x mean_act x the feature's (un-normalised) decoder direction to every component."""
    norm = math.sqrt(sum(v * v for v in direction.values()))
    shift = {c: float(alpha) * mean_act * v for c, v in direction.items()}
    return Condition(f"{feature_name}|add|{_fmt(alpha)}", feature_name, "sae", "sae", "add", float(alpha),
                     shift=shift, after=after, typical=mean_act, perturbation_rms=abs(alpha) * mean_act * norm)


def random_direction(components: list[str], seed: int, run_seed: int = 0,
                     weights: Optional[dict[str, float]] = None) -> dict[str, float]:
    """A random unit vector of the adapter state (numpy, seeded by (run_seed, seed)).

    Without `weights`: uniform on the unit sphere of the raw state. With weights (each
    component's RMS): drawn in those units, then mapped back and renormalised, so the
    direction leans on components in proportion to their scale."""
    if not components:
        raise ValueError("a random direction needs at least one component")
    rng = np.random.default_rng([int(run_seed), 104729, int(seed)])
    v = rng.standard_normal(len(components))
    if weights is not None:
        v = v * np.array([weights[c] for c in components], dtype=np.float64)
    n = float(np.linalg.norm(v))
    if n == 0:
        raise ValueError("random direction of norm 0 (every component weight is 0)")
    return {canonical(c): float(x / n) for c, x in zip(components, v)}


def random_condition(direction: dict[str, float], seed: int, magnitude: float, target: Condition) -> Condition:
    """The control of `target`: add `magnitude` x a random unit direction at the same positions."""
    shift = {c: magnitude * v for c, v in direction.items()}
    return Condition(f"random:{seed}|{target.id}", target.target, "random", target.source, target.mode,
                     target.alpha, seed=int(seed), shift=shift, after=target.after, typical=target.typical,
                     perturbation_rms=abs(magnitude))


def state_norm(cond: Condition) -> float:
    """Norm of the constant part (the shifts) of a condition's change of the adapter state."""
    return math.sqrt(sum(v * v for v in cond.shift.values()))


# --------------------------------------------------------------------------- hooks


def _decoder(model):
    """The decoder module (`<CausalLM>.<base_model_prefix>`) under a peft or plain model."""
    try:
        return _find_decoder(model)
    except ValueError as e:
        raise SteerError(str(e)) from None


class SteeringHooks:
    """Context manager: while open, the components of `cond` have their lora_A outputs mapped.

        with SteeringHooks(peft_model, cond):
            model.generate(...)

    `prompt_width`: index in the padded rows where the prompt ends. None (generation): taken
    from each forward pass that starts with an empty KV cache (the prefill of a left-padded
    batch). Teacher-forced passes over prompt + response must pin it.
    All hooks are removed on exit, also after an error."""

    def __init__(self, model, cond: Condition, prompt_width: Optional[int] = None):
        self.model = model
        self.cond = cond
        self.prompt_width = prompt_width
        self._pinned = prompt_width is not None
        self._handles: list = []
        self._gate = None
        comps = lora_components(model)
        touched = sorted(set(cond.scale) | set(cond.shift))
        missing = [c for c in touched if c not in comps]
        if missing:
            raise SteerError(f"condition {cond.id!r} steers {missing[0]!r}, which the adapter does not have "
                             f"(it has {len(comps)} components, {next(iter(comps))}..{next(reversed(comps))})")
        self._modules = hooked_modules(comps, touched)

    def _pre(self, module, args, kwargs):
        import torch

        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        t = int(x.shape[1])
        cache = kwargs.get("past_key_values")
        seen = int(cache.get_seq_length()) if cache is not None else 0
        if seen == 0 and not self._pinned:
            self.prompt_width = t
        if self.cond.after is None:
            self._gate = None
        else:
            start = self.prompt_width + self.cond.after
            self._gate = (torch.arange(seen, seen + t) >= start).view(1, t, 1)

    def _hook(self, names: list[str]):
        if len(names) == 1:  # rank 1: one scalar per token
            a = float(self.cond.scale.get(names[0], 1.0))
            b = float(self.cond.shift.get(names[0], 0.0))
        else:  # rank r: one (scale, shift) per direction, in row order
            import torch

            a = torch.tensor([float(self.cond.scale.get(n, 1.0)) for n in names])
            b = torch.tensor([float(self.cond.shift.get(n, 0.0)) for n in names])

        def hook(module, inputs, out):
            new = out * a + b if len(names) == 1 else out * a.to(out) + b.to(out)
            if self._gate is None:
                return new
            import torch

            return torch.where(self._gate.to(out.device), new, out)

        return hook

    def __enter__(self) -> "SteeringHooks":
        _, dec = _decoder(self.model)
        try:
            self._handles.append(dec.register_forward_pre_hook(self._pre, with_kwargs=True))
            for mod, names in self._modules:
                self._handles.append(mod.register_forward_hook(self._hook(names)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._gate = None

    def __exit__(self, *exc) -> None:
        self.close()


def hook_count(model) -> int:
    """Forward (pre-)hooks on the decoder and every lora_A module (0 when nothing is steered)."""
    _, dec = _decoder(model)
    n = len(dec._forward_pre_hooks) + len(dec._forward_hooks)
    for mod in {id(m): m for m in lora_components(model).values()}.values():
        n += len(mod._forward_hooks) + len(mod._forward_pre_hooks)
    return n


# --------------------------------------------------------------------------- measures


def hesitation_pattern(words: Iterable[str]) -> re.Pattern:
    """Any hesitation word, whole-word and case-insensitive: the one rule of
    `rank1_core.lexicon` ("Wait" counts in "Wait," and " wait.", not in "Waiting" or "await")."""
    return word_pattern(words)


def count_hesitations(text: str, words: Iterable[str] | re.Pattern) -> int:
    return count_words(text, words)


@dataclass
class TeacherBatch:
    """Prompt + response rows laid out as in generation: prompts left-padded to a common
    width, responses right-padded after it; the scored positions predict response tokens."""

    ids: object
    attn: object
    position_ids: object
    width: int
    rows_idx: object
    """Row of each scored position."""
    t_idx: object
    """Index in the padded row of each scored position (response token j: width + j - 1)."""
    n_rows: int


def teacher_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  after: Optional[int] = None) -> Optional[TeacherBatch]:
    """The layout, scoring the response tokens predicted from steered positions (`after`
    None: all of them; k: tokens j >= k + 1). None when nothing is scored."""
    import torch

    b = len(prompts)
    width = max(len(p) for p in prompts)
    rlen = max((len(r) for r in responses), default=0)
    first = 0 if after is None else after + 1
    pos = [(r, width + j - 1) for r in range(b) for j in range(first, len(responses[r]))]
    if not pos:
        return None
    ids = torch.full((b, width + rlen), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width + rlen), dtype=torch.long)
    for r, (p, x) in enumerate(zip(prompts, responses)):
        ids[r, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        ids[r, width:width + len(x)] = torch.tensor(x, dtype=torch.long)
        attn[r, width - len(p):width + len(x)] = 1
    return TeacherBatch(ids, attn, (attn.cumsum(-1) - 1).clamp_min(0), width,
                        torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos]), b)


def _hidden(decoder, tb: TeacherBatch):
    dev = next(decoder.parameters()).device  # the layout is built on the CPU; the model may be on cuda
    return decoder(input_ids=tb.ids.to(dev), attention_mask=tb.attn.to(dev), position_ids=tb.position_ids.to(dev),
                   use_cache=False).last_hidden_state


def ref_logprobs(decoder, head, tb: TeacherBatch, chunk_positions: int = 256):
    """Unsteered next-token log-probabilities at the scored positions, float32 [positions, vocab]."""
    import torch

    with torch.inference_mode():
        h = _hidden(decoder, tb)
        return torch.cat([torch.log_softmax(head(h[tb.rows_idx[i:i + chunk_positions], tb.t_idx[i:i + chunk_positions]])
                                            .float(), dim=-1)
                          for i in range(0, len(tb.rows_idx), chunk_positions)])


def kl_rows(lm, decoder, head, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            hooks_factory=None, after: Optional[int] = None, chunk_positions: int = 256, ref_logp=None):
    """Per row (kl_sum, kl_max, n_scored) of KL(steered || unsteered), teacher-forced on
    prompt + response, over the response tokens predicted from steered positions.

    `hooks_factory(width)` returns the steering context (None: the steered model is the
    unsteered one, KL 0 without any forward pass). `ref_logp`: the unsteered log-probabilities
    of this layout (`ref_logprobs`), when the caller has them already."""
    import torch

    from rank1_core.ablation import kl_per_position

    tb = teacher_batch(prompts, responses, pad_id, after)
    out = [(0.0, 0.0, 0) for _ in prompts]
    if tb is None:
        return out
    if hooks_factory is None:
        return [(0.0, 0.0, int((tb.rows_idx == r).sum())) for r in range(tb.n_rows)]
    if ref_logp is None:
        ref_logp = ref_logprobs(decoder, head, tb, chunk_positions)
    with torch.inference_mode():
        with hooks_factory(tb.width):
            h_st = _hidden(decoder, tb)
        kl = torch.cat([kl_per_position(head(h_st[tb.rows_idx[i:i + chunk_positions], tb.t_idx[i:i + chunk_positions]]),
                                        ref_logp[i:i + chunk_positions]).double()
                        for i in range(0, len(tb.rows_idx), chunk_positions)])
    for r in range(tb.n_rows):
        sel = kl[tb.rows_idx == r]
        if sel.numel():
            out[r] = (float(sel.sum()), float(sel.max()), int(sel.numel()))
    return out


# --------------------------------------------------------------------------- the actor


@dataclass
class WorkerSpec:
    """What a steering actor loads and how it generates."""

    model_dir: str
    adapter_dir: str
    dtype: str = "float32"
    max_new_tokens: int = 128
    batch_size: int = 8
    threads: int = 0
    answer_marker: str = "<|im_start|>answer"
    tail_chars: int = 300
    missing_marker: str = "wrong"
    """A response without the answer marker: 'wrong' or 'grade_tail' (rank1_core.grading.grade)."""
    hesitation_tokens: list[str] = field(default_factory=lambda: ["Wait", "Hmm"])
    ref_cache_mb: int = 1024
    """Unsteered log-probabilities kept per batch of prompts (every condition of a batch
    shares them); 0: recompute for every work unit."""

    def to_dict(self) -> dict:
        return asdict(self)


class SteerWorker:
    """Holds base model + adapter (transformers + peft, greedy) and runs work units:

        unit = {"condition": Condition.to_dict(), "items": [{benchmark, problem_id, prompt_ids,
                answer, kind, n_choices, baseline_ids (the unsteered response; None for the
                unsteered condition itself)}, ...]}

    and returns one row per item (SAMPLE_COLUMNS). Ray makes it an actor (`ray_jobs/steer.py`);
    tests call it directly."""

    def __init__(self, spec: dict):
        from rank1_core.generation import HFGenerator, SamplingSettings, local_dir

        self.spec = WorkerSpec(**spec)
        self._tmp = tempfile.mkdtemp(prefix="rank1-steer-")
        model_dir = local_dir(self.spec.model_dir, self._tmp)
        adapter = local_dir(self.spec.adapter_dir, self._tmp)
        self.gen = HFGenerator(model_dir, {"lora": str(adapter)}, "peft",
                               SamplingSettings(max_new_tokens=self.spec.max_new_tokens, temperature=0.0, n=1),
                               self.spec.dtype, batch_size=self.spec.batch_size, threads=self.spec.threads)
        self.model = self.gen.model
        self.model.set_adapter("lora")
        self.components = list(lora_components(self.model))
        self.lm, self.decoder = _decoder(self.model)
        self.head = self.lm.get_output_embeddings()
        self.pattern = hesitation_pattern(self.spec.hesitation_tokens)
        self._ref: "OrderedDict[tuple, object]" = OrderedDict()
        self._ref_bytes = 0

    def reference(self, key: tuple, prompts: list[list[int]], responses: list[list[int]], after: Optional[int]):
        """Unsteered log-probabilities of one batch's teacher-forced layout, cached (LRU, at most
        `ref_cache_mb`) by its problems and `after`."""
        key = (key, after)
        if key in self._ref:
            self._ref.move_to_end(key)
            return self._ref[key]
        tb = teacher_batch(prompts, responses, self.gen.pad_id, after)
        if tb is None:
            return None
        ref = ref_logprobs(self.decoder, self.head, tb)
        size = ref.numel() * ref.element_size()
        limit = self.spec.ref_cache_mb << 20
        if size <= limit:
            while self._ref and self._ref_bytes + size > limit:
                _, old = self._ref.popitem(last=False)
                self._ref_bytes -= old.numel() * old.element_size()
            self._ref[key] = ref
            self._ref_bytes += size
        return ref

    def generate(self, cond: Condition, prompts: list[list[int]]):
        """Greedy completions of `prompts` under `cond` (hooks removed afterwards)."""
        if cond.identity and cond.target_kind == "none":
            return self.gen.generate(prompts, "lora")
        with SteeringHooks(self.model, cond):
            return self.gen.generate(prompts, "lora")

    def __call__(self, unit: dict) -> list[dict]:
        from rank1_core.grading import grade

        cond = Condition.from_dict(unit["condition"])
        items = unit["items"]
        rows: list[dict] = []
        for i in range(0, len(items), self.spec.batch_size):
            part = items[i:i + self.spec.batch_size]
            prompts = [list(map(int, it["prompt_ids"])) for it in part]
            outs = [s[0] for s in self.generate(cond, prompts)]
            base = [it.get("baseline_ids") for it in part]
            if all(x is not None for x in base):
                responses = [list(map(int, x)) for x in base]
                if cond.identity:
                    factory, ref = None, None
                else:
                    factory = lambda w: SteeringHooks(self.model, cond, prompt_width=w)  # noqa: E731
                    key = tuple((it["benchmark"], str(it["problem_id"])) for it in part)
                    ref = self.reference(key, prompts, responses, cond.after)
                kls = kl_rows(self.lm, self.decoder, self.head, prompts, responses, self.gen.pad_id,
                              factory, cond.after, ref_logp=ref)
            else:
                responses, kls = None, [(0.0, 0.0, 0)] * len(part)
            for k, (it, c) in enumerate(zip(part, outs)):
                g = grade(c.text, str(it["answer"]), it["kind"], self.spec.answer_marker, self.spec.tail_chars,
                          int(it.get("n_choices") or 0) or 4, self.spec.missing_marker)
                rows.append({"condition": cond.id, "benchmark": it["benchmark"], "problem_id": str(it["problem_id"]),
                             "response": c.text, "n_tokens": c.n_tokens, "finished": c.finished,
                             "correct": g.correct, "marker_found": g.marker_found,
                             "hesitations": count_hesitations(c.text, self.pattern),
                             "kl_sum": kls[k][0], "kl_max": kls[k][1], "kl_tokens": kls[k][2],
                             "identical": True if responses is None else list(c.token_ids) == responses[k],
                             "token_ids": list(c.token_ids)})
        return rows

    def run(self, unit: dict) -> list[dict]:
        """The same as calling the worker (Ray actors expose named methods only)."""
        return self(unit)

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


# --------------------------------------------------------------------------- targets


def hesitation_contexts(contexts, source: str, words: Iterable[str], offsets: Iterable[int], sign: str = "pos"):
    """Per feature of `source`: how many of its top `sign` contexts have a hesitation word
    starting at one of `offsets` from the hit token (case-insensitive, as `rank1_core.lexicon`). DataFrame feature, n_contexts,
    n_hesitation, hesitation_value (sum of those contexts' values), sorted strongest first
    (most hesitation contexts, then the larger summed value)."""
    import pandas as pd

    start = word_start_pattern(words)
    offsets = sorted(set(int(o) for o in offsets))
    df = contexts[(contexts["source"] == source) & (contexts["sign"] == sign)]
    rows = {}
    for r in df.itertuples(index=False):
        toks = list(r.context_tokens)
        hit = int(r.hit_index)
        found = False
        for o in offsets:
            j = hit + o
            if j >= len(toks) or not str(toks[j]).strip():
                continue
            text = str(toks[j]).lstrip() + "".join(str(t) for t in toks[j + 1:j + 4])
            if start.match(text):
                found = True
                break
        acc = rows.setdefault(r.feature, [0, 0, 0.0])
        acc[0] += 1
        if found:
            acc[1] += 1
            acc[2] += abs(float(r.value))
    out = pd.DataFrame([(f, a[0], a[1], a[2]) for f, a in rows.items()],
                       columns=["feature", "n_contexts", "n_hesitation", "hesitation_value"])
    return out.sort_values(["n_hesitation", "hesitation_value", "feature"], ascending=[False, False, True],
                           kind="stable").reset_index(drop=True)


@dataclass
class Target:
    name: str
    kind: str
    """component | sae"""
    chosen_by: str
    """config | auto"""
    typical: float
    n_contexts: int = 0
    n_hesitation: int = 0


def check_components(names: Iterable[str], adapter_components: list[str], where: str = "steer.components") -> list[str]:
    """Canonical names, or a SteerError naming the first unknown one and what exists."""
    have = {canonical(c) for c in adapter_components}
    out = []
    for n in names:
        try:
            c = canonical(n)
        except ValueError as e:
            raise SteerError(f"{where}: {e}") from None
        if c not in have:
            ordered = sorted(have, key=component_order)
            raise SteerError(f"{where}: unknown component {n!r}: the trained adapter has {len(have)} "
                             f"components, {ordered[0]} .. {ordered[-1]}")
        out.append(c)
    return out


def check_sae_features(names: Iterable[str], latents, where: str = "steer.sae_features") -> list[int]:
    """Feature indices of `names` (F00012), or a SteerError for one that does not exist or is not live."""
    by_name = {str(r.name): r for r in latents.itertuples(index=False)}
    live = int(latents["live"].sum())
    out = []
    for n in names:
        r = by_name.get(n)
        if r is None:
            raise SteerError(f"{where}: SAE feature {n!r} does not exist (the SAE has {len(latents)} latents, "
                             f"F00000 .. {latents['name'].iloc[-1]})")
        if not bool(r.live):
            why = "dead in training" if bool(getattr(r, "dead_in_training", False)) else "never fires"
            raise SteerError(f"{where}: SAE feature {n!r} is not live ({why}); {live} of {len(latents)} "
                             "features are live (sae/latents.parquet, column live)")
        if not float(r.mean_act) > 0:
            raise SteerError(f"{where}: SAE feature {n!r} has mean activation {r.mean_act!r}; nothing to scale by")
        out.append(int(r.feature))
    return out


# --------------------------------------------------------------------------- results


RESULT_COLUMNS = ["condition", "target", "target_kind", "source", "mode", "alpha", "seed", "after", "typical",
                  "perturbation_rms", "n", "n_tokens", "hesitation_count", "hesitation_rate", "mean_length",
                  "accuracy", "accuracy_stderr", "kl_mean", "kl_max", "kl_tokens", "finished_rate",
                  "marker_rate", "identical_rate"]


def aggregate(samples, conditions: list[Condition]):
    """One row per condition (RESULT_COLUMNS): hesitation words per 100 generated tokens (total
    words / total tokens), mean length, accuracy (± stderr over prompts), mean KL per scored token."""
    import pandas as pd

    g = {k: v for k, v in samples.groupby("condition", sort=False)}
    rows = []
    for c in conditions:
        s = g.get(c.id)
        if s is None or s.empty:
            raise ValueError(f"no samples for steering condition {c.id!r}")
        n = len(s)
        tokens = int(s["n_tokens"].sum())
        hes = int(s["hesitations"].sum())
        acc = float(s["correct"].mean())
        se = float(s["correct"].astype(float).std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        kt = int(s["kl_tokens"].sum())
        rows.append({
            "condition": c.id, "target": c.target, "target_kind": c.target_kind, "source": c.source,
            "mode": c.mode, "alpha": c.alpha, "seed": c.seed, "after": c.after, "typical": c.typical,
            "perturbation_rms": c.perturbation_rms, "n": n, "n_tokens": tokens, "hesitation_count": hes,
            "hesitation_rate": 100.0 * hes / tokens if tokens else float("nan"),
            "mean_length": tokens / n, "accuracy": acc, "accuracy_stderr": se,
            "kl_mean": float(s["kl_sum"].sum()) / kt if kt else 0.0,
            "kl_max": float(s["kl_max"].max()), "kl_tokens": kt,
            "finished_rate": float(s["finished"].mean()), "marker_rate": float(s["marker_found"].mean()),
            "identical_rate": float(s["identical"].mean()),
        })
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    df["after"] = df["after"].astype("Int64")
    return df


# --------------------------------------------------------------------------- figures


MEASURES = (("hesitation_rate", "hesitation words / 100 tokens"), ("mean_length", "response length (tokens)"),
            ("accuracy", "accuracy"), ("kl_mean", "KL(steered || unsteered), nats/token"))
MODE_COLOURS = {"scale": "#d95f02", "set": "#1b9e77", "add": "#7570b3"}


def figure_name(source: str, target: str) -> str:
    return f"{source}_{target}.png"


def plot_target(results, target: str, path: str | Path, dpi: int = 110, title_extra: str = "") -> Path:
    """Measures vs alpha for one steered feature: a line per mode, the random controls of the
    same mode as a band (min to max over seeds) with their mean dashed, and the unsteered
    model as a dotted line. x: alpha on a symmetric log scale."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[results["target"] == target]
    own = r[r["target_kind"].isin(["component", "sae"])]
    if own.empty:
        raise ValueError(f"no steering results for target {target!r}")
    kind = own["target_kind"].iloc[0]
    rnd = r[r["target_kind"] == "random"]
    base = results[results["target_kind"] == "none"]
    ticks = sorted(float(a) for a in own["alpha"].unique())
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (col, label) in zip(axes.flat, MEASURES):
        for mode, m in own.groupby("mode", sort=False):
            m = m.sort_values("alpha")
            colour = MODE_COLOURS.get(mode, "k")
            ax.plot(m["alpha"], m[col], "o-", color=colour, lw=1.8, ms=4, label=f"{target} ({mode})")
            rm = rnd[rnd["mode"] == mode]
            if not rm.empty:
                band = rm.groupby("alpha")[col].agg(["min", "max", "mean"]).sort_index()
                n_seeds = rm["seed"].nunique()
                ax.fill_between(band.index, band["min"], band["max"], color=colour, alpha=0.18, lw=0,
                                label=f"random directions, {mode} ({n_seeds} seeds, min-max)")
                ax.plot(band.index, band["mean"], "--", color=colour, lw=1, alpha=0.8,
                        label=f"random directions, {mode} (mean)")
        if not base.empty:
            ax.axhline(float(base[col].iloc[0]), color="0.4", ls=":", lw=1.2, label="unsteered")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{a:g}" for a in ticks], fontsize=8)
        if col == "kl_mean":
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        if col == "accuracy":
            ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("alpha" + (" (x own activation in scale mode; x typical in set/add)" if kind == "component"
                                 else " (x mean activation when firing)"))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    what = "adapter component" if kind == "component" else "SAE feature"
    typ = float(own["typical"].iloc[0])
    after = own["after"].iloc[0]
    where = "every token" if pd.isna(after) else f"tokens >= prompt end + {int(after)}"
    typ_name = "RMS activation" if kind == "component" else "mean activation when firing"
    fig.suptitle(f"Steering {what} {target}: {typ_name} {typ:.3g}; steered at {where}; "
                 f"n = {int(own['n'].iloc[0])} prompts{title_extra}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = Path(path)
    try:
        with atomic_local_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
