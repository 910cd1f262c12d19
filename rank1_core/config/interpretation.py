"""Config sections of interpretation: autointerp (and its LLMs) and report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rank1_core.config.errors import ConfigError


@dataclass
class LLMModelConfig:
    """One LLM the autointerp stage can call: where it lives, its rate limits and its prices."""

    name: str = "gpt-5-mini"
    """Name used by autointerp.tasks, the limiter, the price table and the logs."""
    provider: Literal["openai", "anthropic"] = "openai"
    """'openai': the official openai SDK (OpenAI, or any OpenAI-compatible server via base_url,
    such as vLLM); 'anthropic': the official anthropic SDK."""
    model: Optional[str] = None
    """Model id sent to the provider (None: `name`)."""
    base_url: Optional[str] = None
    """Server address (None: the provider's public API)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key (keys are never put in configs)."""
    rpm: float = 500.0
    """Requests per minute allowed to all actors of a run together."""
    tpm: Optional[float] = 200_000.0
    """Tokens (prompt estimate + max output) per minute for all actors together (None: no limit)."""
    input_usd_per_mtok: float = 0.0
    """Price of a million prompt tokens, US dollars (the call log's cost and the budget)."""
    output_usd_per_mtok: float = 0.0
    """Price of a million output tokens, US dollars."""
    structured: bool = True
    """Send each answer's JSON schema (response_format / output_config) so answers parse."""
    schema_limits: bool = False
    """Add string/array length limits to the schemas (small local models; some hosted strict
    modes reject those keywords)."""
    temperature: Optional[float] = None
    """Sampling temperature (None: the provider's default; gpt-5 models accept only that)."""
    extra_output_tokens: int = 0
    """Added to every task's max_tokens for this model (reasoning models think first)."""
    params: dict = field(default_factory=dict)
    """Extra request parameters sent as they are (e.g. {reasoning_effort: low})."""
    timeout_s: float = 120.0
    """Seconds before a request counts as timed out (and is retried). The provider may still
    finish and bill the abandoned request: keep it above the slowest normal answer (docs/stages/autointerp.md)."""

    def __post_init__(self) -> None:
        where = f"autointerp.models[{self.name!r}]"
        if not self.name:
            raise ConfigError("autointerp.models: every model needs a non-empty 'name'")
        if self.rpm <= 0:
            raise ConfigError(f"{where}.rpm must be > 0, got {self.rpm!r}")
        if self.tpm is not None and self.tpm <= 0:
            raise ConfigError(f"{where}.tpm must be > 0 or null, got {self.tpm!r}")
        for k in ("input_usd_per_mtok", "output_usd_per_mtok", "extra_output_tokens"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{where}.{k} must be >= 0, got {getattr(self, k)!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"{where}.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"{where}.api_key_env must be an environment variable NAME, "
                              f"not a key (got a value of length {len(self.api_key_env)})")


@dataclass
class AutointerpTaskConfig:
    """Which model answers one task, and its output budget."""

    model: str = "gpt-5-mini"
    """Name of an entry of autointerp.models."""
    max_tokens: int = 300
    """Most output tokens of one answer (before the model's extra_output_tokens)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"autointerp.tasks.*.max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass
class AutointerpTasks:
    """Model per task (paper: gpt-5-mini explains, classifies and categorizes; claude-opus-4.1
    generates the categories)."""

    explain: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 300))
    """B.1: explanation + 0/1/2 classification of each feature."""
    categories: AutointerpTaskConfig = field(
        default_factory=lambda: AutointerpTaskConfig("claude-opus-4-1", 4000))
    """B.2: category generation, one call per category group."""
    categorize: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 50))
    """B.2: one category per feature."""
    score: AutointerpTaskConfig = field(default_factory=lambda: AutointerpTaskConfig("gpt-5-mini", 200))
    """Detection scoring of each explanation (beyond the paper)."""


@dataclass
class LocalLLMServerConfig:
    """The local OpenAI-compatible vLLM server answering every task when no API key is set."""

    model: Optional[str] = None
    """Model to serve: a built-in name or a local HF directory (None: model.name, the run's
    instruct model)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Serving dtype (auto: bfloat16 where the hardware runs it fast, else float32). bfloat16 measured 3-5x faster than float32 here (SmolLM2, 2 busy cores:
    prefill 1,800 vs 356 tokens/s, decode 96-137 vs 35-53 tokens/s at 8 concurrent requests);
    its known crash needs prompts of <= 4 tokens, which chat prompts never are."""
    max_model_len: int = 8192
    """Longest prompt + answer in tokens (SmolLM2: up to 8192)."""
    kv_cache_gb: float = 1.0
    """KV-cache memory (vLLM otherwise reserves ~90% of RAM); SmolLM2 in bfloat16 needs
    ~23 KB per token, so 1 GB holds ~45k tokens (16 prompts of 2.8k)."""
    max_num_seqs: int = 16
    """Requests the engine batches at once."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for the server to answer (start-up is ~20-40 s)."""
    rpm: float = 100_000.0
    """Requests per minute (a local server needs no limit; concurrency bounds it)."""
    temperature: Optional[float] = 0.0
    """Sampling temperature (0: greedy, reproducible)."""
    max_tokens: int = 1024
    """Cap on any one answer's tokens (prompt + answer must fit max_model_len)."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm.entrypoints.openai.api_server` arguments."""

    def __post_init__(self) -> None:
        if self.max_model_len < 256:
            raise ConfigError(f"autointerp.local_server.max_model_len must be >= 256, got {self.max_model_len!r}")
        if self.kv_cache_gb <= 0:
            raise ConfigError(f"autointerp.local_server.kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"autointerp.local_server.max_num_seqs must be >= 1, got {self.max_num_seqs!r}")
        if not 1 <= self.max_tokens < self.max_model_len:
            raise ConfigError(f"autointerp.local_server.max_tokens must be in [1, max_model_len), "
                              f"got {self.max_tokens!r}")


AUTOINTERP_SOURCES = ("adapter", "neuron", "sae", "transcoder")


@dataclass
class AutointerpConfig:
    """LLM explanations, classifications, categories and scores (rate-limited actors)."""

    models: list[LLMModelConfig] = field(default_factory=lambda: [
        LLMModelConfig(name="gpt-5-mini", provider="openai", api_key_env="OPENAI_API_KEY",
                       rpm=500, tpm=200_000, input_usd_per_mtok=0.25, output_usd_per_mtok=2.0,
                       extra_output_tokens=2000),
        LLMModelConfig(name="claude-opus-4-1", provider="anthropic", api_key_env="ANTHROPIC_API_KEY",
                       rpm=50, tpm=30_000, input_usd_per_mtok=15.0, output_usd_per_mtok=75.0),
    ])
    """LLMs that can be called, with rate limits and the price table (USD per million tokens)."""
    tasks: AutointerpTasks = field(default_factory=AutointerpTasks)
    """Model and output budget per task."""
    use_local_server: Optional[bool] = None
    """Answer every task with a local vLLM server started by the stage. None: yes when no
    task's model has an API key in the environment or a base_url (resolved at run time and
    recorded in the stage's config, so setting a key later reruns with the hosted models)."""
    local_server: LocalLLMServerConfig = field(default_factory=LocalLLMServerConfig)
    """The local server's model and CPU settings."""
    sources: list[str] = field(default_factory=lambda: list(AUTOINTERP_SOURCES))
    """Feature sources to interpret: adapter components, baseline MLP neurons, SAE features."""
    signs: list[str] = field(default_factory=lambda: ["pos"])
    """Activation signs explained, each its own row ('neg': the most negative contexts)."""
    negative_fallback: bool = True
    """With signs [pos]: a feature that never activates positively (no positive contexts) has
    its negative side explained instead (sign 'neg'), so every component gets an explanation."""
    max_features: dict = field(default_factory=dict)
    """Cap per source, e.g. {neuron: 64} (missing or 0: all); the cap keeps the features with
    the largest max activation (topk/stats.parquet); a never-positive feature explained by its
    negative side (negative_fallback) counts by the size of its min, under the same cap."""
    neurons_per_layer: int = 0
    """Baseline neurons interpreted per MLP: the first N of every layer (neuron index < N), as
    the paper takes the first 60. 0: every neuron the extract stage wrote (extract.mlp_neurons)."""
    explain_contexts: int = 64
    """Top contexts shown per feature for the explanation (paper: 64)."""
    listed_tokens: int = 8
    """Tokens listed with their 0-10 strength under each context (strongest first)."""
    max_prompt_tokens: int = 12_000
    """Estimated prompt size cap: contexts are dropped from the weak end to fit."""
    categorize_contexts: int = 5
    """Contexts shown with the explanation when assigning a category."""
    score_positives: int = 5
    """Held-out activating contexts (ranks after the explanation's) per detection prompt."""
    score_negatives: int = 5
    """Non-activating contexts per detection prompt: other features' contexts not overlapping
    any of this feature's top contexts."""
    scorers: list[str] = field(default_factory=lambda: ["detection", "fuzzing", "simulation"])
    """Explanation scores computed (one call per feature each; see rank1_core/autointerp/scorers.py):
    detection (held-out vs other contexts), fuzzing (held-out contexts with right or random
    tokens marked; score_positives contexts), simulation (0-10 per token, correlation with the
    true activations on the held-out activating contexts)."""
    simulation_tokens: int = 16
    """Tokens per context the simulator predicts (a window around the context's hit)."""
    category_groups: dict = field(default_factory=lambda: {"directions": ["adapter", "neuron"], "sae": ["sae"],
                                                           "transcoder": ["transcoder"]})
    """Sources sharing one generated category set (paper: LoRA directions with MLP neurons;
    SAE features apart)."""
    category_max_features: int = 200
    """Explanations shown to the category generator per group, equal numbers per source."""
    budget_usd: Optional[float] = 10.0
    """Spending cap of the stage in US dollars (None: no cap). The stage stops before a call
    could pass it and keeps what is done; a resumed run counts what was spent before."""
    actors: int = 1
    """Ray worker actors (async; they share one limiter actor). 0: run in the driver, no Ray."""
    concurrency: int = 16
    """Requests in flight per actor."""
    burst_s: float = 1.0
    """Seconds of rate a limiter lets through at once."""
    retry_max_attempts: int = 6
    """Tries per request on 429 / 5xx / timeouts, the first included."""
    retry_base_s: float = 1.0
    """First backoff; doubles per try, with jitter; Retry-After is honoured."""
    retry_max_s: float = 60.0
    """Longest single wait."""
    cache_dir: Optional[str] = None
    """Cache of every request and answer (a path or pyarrow URI; None: $RANK1_CACHE/llm, i.e.
    ~/.cache/rank1/llm). Shared by runs: a rerun never pays for an answer it has."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"autointerp.models: duplicate names {dup}")
        for task in ("explain", "categories", "categorize", "score"):
            m = getattr(self.tasks, task).model
            if m not in names:
                raise ConfigError(f"autointerp.tasks.{task}.model {m!r} is not in autointerp.models ({names})")
        bad = [s for s in self.sources if s not in AUTOINTERP_SOURCES]
        if bad or not self.sources:
            raise ConfigError(f"autointerp.sources must be a non-empty subset of {list(AUTOINTERP_SOURCES)}, "
                              f"got {self.sources!r}")
        if not self.signs or any(s not in ("pos", "neg") for s in self.signs):
            raise ConfigError(f"autointerp.signs must be a non-empty subset of ['pos', 'neg'], got {self.signs!r}")
        for src, cap in self.max_features.items():
            if src not in AUTOINTERP_SOURCES:
                raise ConfigError(f"autointerp.max_features: unknown source {src!r} (known: {list(AUTOINTERP_SOURCES)})")
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ConfigError(f"autointerp.max_features.{src} must be an integer >= 0, got {cap!r}")
        if isinstance(self.neurons_per_layer, bool) or not isinstance(self.neurons_per_layer, int) \
                or self.neurons_per_layer < 0:
            raise ConfigError(f"autointerp.neurons_per_layer must be an integer >= 0, got {self.neurons_per_layer!r}")
        seen: dict[str, str] = {}
        for group, srcs in self.category_groups.items():
            if not isinstance(srcs, list) or not srcs or any(s not in AUTOINTERP_SOURCES for s in srcs):
                raise ConfigError(f"autointerp.category_groups.{group} must be a non-empty list of sources "
                                  f"from {list(AUTOINTERP_SOURCES)}, got {srcs!r}")
            for s in srcs:
                if s in seen:
                    raise ConfigError(f"autointerp.category_groups: source {s!r} is in both {seen[s]!r} and {group!r}")
                seen[s] = group
        for k in ("explain_contexts", "listed_tokens", "categorize_contexts", "category_max_features",
                  "concurrency", "retry_max_attempts", "max_prompt_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"autointerp.{k} must be >= 1, got {getattr(self, k)!r}")
        for k in ("score_positives", "score_negatives", "actors"):
            if getattr(self, k) < 0:
                raise ConfigError(f"autointerp.{k} must be >= 0, got {getattr(self, k)!r}")
        from rank1_core.autointerp.scorers import SCORERS

        if any(s not in SCORERS for s in self.scorers) or len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"autointerp.scorers must be distinct names from {list(SCORERS)}, got {self.scorers!r}")
        if self.simulation_tokens < 2:
            raise ConfigError(f"autointerp.simulation_tokens must be >= 2, got {self.simulation_tokens!r}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ConfigError(f"autointerp.budget_usd must be >= 0 or null, got {self.budget_usd!r}")
        if self.burst_s <= 0 or self.retry_base_s < 0 or self.retry_max_s <= 0:
            raise ConfigError("autointerp.burst_s and autointerp.retry_max_s must be > 0, "
                              f"autointerp.retry_base_s >= 0 (got {self.burst_s!r}, {self.retry_max_s!r}, "
                              f"{self.retry_base_s!r})")

    def model(self, name: str) -> LLMModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class ReportConfig:
    """Tables, figures and HTML feature dashboards of whatever stages of a run are done."""

    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources with dashboards (None: every source the run has)."""
    contexts: int = 64
    """Top contexts shown per feature and sign (paper: 64; at most topk.k exist)."""
    context_before: Optional[int] = None
    """Tokens shown before each hit (None: the whole window the topk stage stored)."""
    context_after: Optional[int] = None
    """Tokens shown after each hit (None: the whole stored window)."""
    trace_max_tokens: int = 2048
    """Longest whole trace on a feature page; a longer document is cut to a window of this
    many tokens around the feature's top hit (the page says so)."""
    histogram_bins: int = 40
    """Bins of each feature's activation histogram."""
    sample_tokens: int = 2_000_000
    """Tokens read (first files first) for the histograms and Figure 3's category densities
    (0: every token; the paper used a subset of the training data)."""
    max_features: int = 0
    """At most this many feature pages per source: explained features (and selected transcoder
    hesitation features) first, then the rest, in catalogue order (0: every feature)."""
    figure_dpi: int = 130
    """Resolution of the PNG figures."""

    def __post_init__(self) -> None:
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("report.sources must not be empty (null: every available source)")
            dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
            if dup:
                raise ConfigError(f"report.sources lists {dup} twice")
        for name in ("contexts", "trace_max_tokens", "figure_dpi"):
            if getattr(self, name) < 1:
                raise ConfigError(f"report.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.histogram_bins < 2:
            raise ConfigError(f"report.histogram_bins must be >= 2, got {self.histogram_bins!r}")
        for name in ("sample_tokens", "max_features"):
            if getattr(self, name) < 0:
                raise ConfigError(f"report.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("context_before", "context_after"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"report.{name} must be >= 0 or null, got {v!r}")
