"""Config sections of extraction and analysis: extract, topk, transcoder_extract, concepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rank1_core.config.errors import ConfigError
from rank1_core.lexicon import HESITATION_WORDS


@dataclass
class ExtractConfig:
    """Per-token adapter activations and baseline MLP neurons to Parquet (Ray Data)."""

    actors: int = 2
    """Actors in the Ray Data pool; each loads the model and adapter once."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves."""
    gpus_per_actor: float = 0.0
    """GPUs each actor reserves (0: run on CPU)."""
    torch_threads: Optional[int] = None
    """torch intra-op threads per actor (None: cpus_per_actor rounded up)."""
    batch_docs: int = 16
    """Documents per Ray Data batch; each batch becomes one Parquet file per table."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass (a longer document runs alone)."""
    mlp_neurons: int = 60
    """Baseline: the first N neurons of every MLP of the unadapted model (paper: 60; 0 = none)."""
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    """Model dtype while extracting (None: model.dtype; auto: bfloat16 where fast). Stored values are float32 either way."""
    splits: list[str] = field(default_factory=lambda: ["train", "heldout"])
    """Which splits of prepare/tokens to extract."""
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    """Parquet compression of the output files."""

    def __post_init__(self) -> None:
        for name in ("actors", "batch_docs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extract.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError(
                f"extract.cpus_per_actor / extract.gpus_per_actor must be >= 0, got "
                f"{self.cpus_per_actor!r} / {self.gpus_per_actor!r}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"extract.torch_threads must be >= 1 or null, got {self.torch_threads!r}")
        if self.mlp_neurons < 0:
            raise ConfigError(f"extract.mlp_neurons must be >= 0, got {self.mlp_neurons!r}")
        bad = [s for s in self.splits if s not in ("train", "heldout")]
        if bad or not self.splits:
            raise ConfigError(f"extract.splits must be a non-empty subset of ['train', 'heldout'], got {self.splits!r}")


@dataclass
class TopkConfig:
    """Top-k activating contexts and per-feature statistics (DuckDB over Parquet)."""

    k: int = 64
    """Contexts per feature and sign (paper: 64)."""
    max_per_doc: int = 4
    """At most this many of a feature's top-k hits (per sign) from one document."""
    window_before: int = 24
    """Tokens of context before each hit."""
    window_after: int = 8
    """Tokens of context after each hit."""
    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources; None: every available one (adapter, neuron if extracted, sae if its
    stage is done). A source listed explicitly must be available."""
    active_threshold: float = 0.0
    """A token counts as active for a feature when its value exceeds this (stats.frac_active)."""
    memory_limit: str = "4GB"
    """DuckDB memory_limit; larger intermediate results spill to temp_dir."""
    threads: Optional[int] = None
    """DuckDB threads (None: DuckDB's default, all cores)."""
    temp_dir: Optional[str] = None
    """Local directory for DuckDB's database and spill files (None: the system temp dir)."""

    def __post_init__(self) -> None:
        for name in ("k", "max_per_doc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"topk.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("window_before", "window_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"topk.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.active_threshold < 0:
            raise ConfigError(f"topk.active_threshold must be >= 0, got {self.active_threshold!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"topk.threads must be >= 1 or null, got {self.threads!r}")
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("topk.sources must not be empty (null: every available source)")
            dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
            if dup:
                raise ConfigError(f"topk.sources lists {dup} twice")
        import re as _re

        if not _re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", self.memory_limit, _re.I):
            raise ConfigError(f"topk.memory_limit must look like '4GB' or '512MiB', got {self.memory_limit!r}")


@dataclass
class TranscoderHesitationSection:
    """`transcoder_extract.hesitation`: which adapter features count as hesitation features (their
    top contexts are hesitation tokens); stage `transcoder_eval` ablates them."""

    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Hesitation words (default: `rank1_core.lexicon.HESITATION_WORDS`); a token matches when its
    letters, lower-cased, equal one of them; `transcoder_eval` counts them in generated text
    whole-word and case-insensitively (the lexicon's one rule, as `steer`; transcoder_eval's hash
    chains this stage's)."""
    match: Literal["token", "next", "either"] = "either"
    """A top context counts when the token at the hit is a hesitation word (token), the token
    after it is (next: the feature fires where the model is about to hesitate), or either."""
    contexts: int = 16
    """Top positive contexts per feature inspected (at most one per document)."""
    min_share: float = 0.5
    """A feature is a hesitation feature when at least this share of its top contexts match."""
    min_contexts: int = 4
    """...and it has at least this many top contexts (rarely firing features are left out)."""
    max_features: int = 0
    """Ablate at most this many (the highest shares first; 0: every one found)."""

    def __post_init__(self) -> None:
        if not self.words or any(not any(c.isalpha() for c in w) for w in self.words):
            raise ConfigError(f"transcoder_extract.hesitation.words must be non-empty words, got {self.words!r}")
        if not 1 <= self.contexts <= 1000:
            raise ConfigError(f"transcoder_extract.hesitation.contexts must be in [1, 1000], got {self.contexts!r}")
        if not 0.0 < self.min_share <= 1.0:
            raise ConfigError(f"transcoder_extract.hesitation.min_share must be in (0, 1], got {self.min_share!r}")
        if not 1 <= self.min_contexts <= self.contexts:
            raise ConfigError(f"transcoder_extract.hesitation.min_contexts must be in [1, contexts={self.contexts}], "
                              f"got {self.min_contexts!r}")
        if self.max_features < 0:
            raise ConfigError(f"transcoder_extract.hesitation.max_features must be >= 0, got {self.max_features!r}")


@dataclass
class TranscoderExtractConfig:
    """Stage `transcoder_extract`: every token's adapter features, in the SAE's sparse layout, and
    the hesitation features among them."""

    splits: list[str] = field(default_factory=lambda: ["train", "heldout"])
    """Splits of prepare/tokens to encode; keep them equal to extract.splits, so topk's token
    table (extract/tokens) covers exactly the tokens the features were measured on."""
    actors: int = 1
    """Ray Data actors; each loads the base model and the adapters once."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves."""
    torch_threads: Optional[int] = None
    """torch threads per actor (None: cpus_per_actor rounded up)."""
    batch_docs: int = 16
    """Documents per Ray Data batch (one Parquet file per batch)."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass."""
    hesitation: TranscoderHesitationSection = field(default_factory=TranscoderHesitationSection)
    """Which features count as hesitation features (transcoder_eval ablates them)."""

    def __post_init__(self) -> None:
        for name in ("actors", "batch_docs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transcoder_extract.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"transcoder_extract.cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"transcoder_extract.torch_threads must be >= 1 or null, got {self.torch_threads!r}")
        bad = [s for s in self.splits if s not in ("train", "heldout")]
        if bad or not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError("transcoder_extract.splits must be a non-empty subset of ['train', 'heldout'], "
                              f"got {self.splits!r}")


@dataclass
class LexicalConcept:
    """A concept defined by words or a regular expression over the decoded text (any data)."""

    name: str = ""
    """Concept name (unique among all concepts)."""
    words: list[str] = field(default_factory=list)
    """Words matched whole-word (the rule of `rank1_core.lexicon`)."""
    regex: Optional[str] = None
    """A Python regular expression instead of `words`; every token overlapping a match is labelled."""
    case_sensitive: bool = False
    """Match case-sensitively (words and regex); the lexicon's rule is case-insensitive."""

    def __post_init__(self) -> None:
        import re as _re

        if not self.name or not _re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ConfigError(f"concepts.lexical: name must be an identifier, got {self.name!r}")
        if bool(self.words) == (self.regex is not None):
            raise ConfigError(f"concepts.lexical: concept {self.name!r} needs exactly one of words or regex")
        if self.regex is not None:
            try:
                _re.compile(self.regex)
            except _re.error as e:
                raise ConfigError(f"concepts.lexical: concept {self.name!r}: regex {self.regex!r} does not compile "
                                  f"({e})") from None
        if any(not w for w in self.words):
            raise ConfigError(f"concepts.lexical: concept {self.name!r} has an empty word")


@dataclass
class SQLConcept:
    """A concept defined by SQL: a query over the run's views (`tokens`, ...) returning the
    (doc_id, pos) rows of the concept."""

    name: str = ""
    """Concept name (unique among all concepts)."""
    query: str = ""
    """A query of `queries/` by name (`concept_after_equals`) or a path to a .sql file."""

    def __post_init__(self) -> None:
        import re as _re

        if not self.name or not _re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ConfigError(f"concepts.sql: name must be an identifier, got {self.name!r}")
        if not self.query:
            raise ConfigError(f"concepts.sql: concept {self.name!r} needs a query (a name in queries/ or a file)")


@dataclass
class ConceptsConfig:
    """Ground truth: token-level concept labels (planted by the synthetic generator, lexical,
    SQL) and, for every feature x concept, AUROC and top-k precision against random
    directions and shuffled labels (stage `concepts`)."""

    planted: bool = True
    """Use prepare's spans (the synthetic generator's planted concepts and the think/answer
    sections) when prepare wrote them."""
    lexical: list[LexicalConcept] = field(default_factory=lambda: [
        LexicalConcept(name="hesitation_word", words=list(HESITATION_WORDS)),
        LexicalConcept(name="number", regex=r"[0-9]+"),
        LexicalConcept(name="newline", regex=r"\n"),
    ])
    """Lexical concepts, for any data (s1K-1.1 included)."""
    sql: list[SQLConcept] = field(default_factory=lambda: [
        SQLConcept(name="after_equals", query="concept_after_equals")])
    """SQL concepts: queries returning (doc_id, pos)."""
    sources: Optional[list[Literal["adapter", "neuron", "sae", "transcoder"]]] = None
    """Feature sources; None: every available one (as topk)."""
    k: int = 64
    """Top contexts per feature and sign whose peak tokens give the precision (paper: 64)."""
    max_per_doc: int = 4
    """At most this many of those contexts from one document (as topk.max_per_doc)."""
    clean_auroc: float = 0.9
    """A feature is clean when its best concept's AUROC reaches this ..."""
    clean_precision: float = 0.8
    """... and that concept's top-k precision reaches this."""
    broad_auroc: float = 0.75
    """Not clean but best AUROC at least this: broad; below: unmatched."""
    best_excludes: list[str] = field(default_factory=lambda: ["think", "answer"])
    """Concepts never chosen as a feature's best concept (whole sections: a feature that fires
    anywhere in the thinking is not a detector of anything). Their scores are still written."""
    random_directions: int = 16
    """Control: random unit directions in the adapter's activation space, scored like components."""
    bootstrap: int = 200
    """Bootstrap replicates over documents for the aggregate shares (0: none)."""
    bootstrap_blocks: int = 50
    """Documents are resampled in this many random blocks (at most one document per block)."""
    hist_bits: int = 16
    """Histogram resolution of the AUROC: the leading bits of each float32 value (16: 65,536
    bins, 7 mantissa bits); each AUROC carries its exact error bound."""
    memory_mb: int = 512
    """Feature values held at once: a pass reads as many columns / sparse rows as fit. The
    random-direction projections (4 bytes per token and direction) count against it, but the
    columns keep at least half."""
    keywords: dict = field(default_factory=dict)
    """Explanation keywords per concept ({concept: [words]}), added to the built-in lists of
    `rank1_core.concepts.KEYWORDS`: an explanation names a concept when it contains one."""
    seed: int = 0
    """Seed of the random directions, shuffled labels and bootstrap."""

    def __post_init__(self) -> None:
        for name in ("k", "max_per_doc", "hist_bits", "memory_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"concepts.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 8 <= self.hist_bits <= 24:
            raise ConfigError(f"concepts.hist_bits must be in [8, 24], got {self.hist_bits!r}")
        for name in ("random_directions", "bootstrap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"concepts.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bootstrap_blocks < 2:
            raise ConfigError(f"concepts.bootstrap_blocks must be >= 2, got {self.bootstrap_blocks!r}")
        for name in ("clean_auroc", "clean_precision", "broad_auroc"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"concepts.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.broad_auroc > self.clean_auroc:
            raise ConfigError(f"concepts.broad_auroc ({self.broad_auroc}) must not exceed concepts.clean_auroc "
                              f"({self.clean_auroc})")
        names = [c.name for c in self.lexical] + [c.name for c in self.sql]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"concepts: concept name(s) {dup} defined twice")
        if len(names) > 40:
            raise ConfigError(f"concepts: at most 40 lexical + SQL concepts, got {len(names)}")
        bad = {k: v for k, v in self.keywords.items() if not isinstance(v, list) or not all(isinstance(w, str) for w in v)}
        if bad:
            raise ConfigError(f"concepts.keywords must map a concept to a list of words, got {bad!r}")
        if self.sources is not None and not self.sources:
            raise ConfigError("concepts.sources must not be empty (null: every available source)")
