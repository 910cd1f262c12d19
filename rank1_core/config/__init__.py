"""One config system for every stage: dataclasses, YAML files, dotted overrides.

The loader (`load_config`, `config_from_dict`, overrides, `section_hash`, `dump_yaml`, the root
`Config`) is `loader.py`; the section dataclasses sit by concern, a docstring under every
field, `__post_init__` rejecting a bad value by its dotted key:

- `data.py`: run, ray, model (and the tiny model), data (benchmarks, task mix), plan
- `training.py`: train (lora, full), sae, transcoder, and the `Scaling` they share
- `analysis.py`: extract, topk, transcoder_extract, concepts
- `evaluation.py`: evaluate, ablate, steer, transcoder_eval
- `interpretation.py`: autointerp (its LLMs and tasks), report

Which sections each stage's hash covers is `rank1_core.stages`. Every name is re-exported
here: `from rank1_core.config import X`. No ray and no torch in this package.
"""

from rank1_core.config.errors import ConfigError  # noqa: F401
from rank1_core.config.data import (RunConfig, RayConfig, TinyModelConfig, ModelConfig, BenchmarkConfig, TaskMix,
                                    DataConfig, PlanConfig)  # noqa: F401
from rank1_core.config.training import (LORA_MODULES, LoraSection, FullSection, Scaling, TrainConfig, SAEConfig,
                                        TranscoderConfig)  # noqa: F401
from rank1_core.config.analysis import (ExtractConfig, TopkConfig, TranscoderHesitationSection,
                                        TranscoderExtractConfig, LexicalConcept, SQLConcept, ConceptsConfig)  # noqa: F401
from rank1_core.config.evaluation import (VLLMSettings, EvaluateConfig, AblationGroup, AblateConfig, STEER_MODES,
                                          SteerConfig, TranscoderEvalConfig)  # noqa: F401
from rank1_core.config.interpretation import (LLMModelConfig, AutointerpTaskConfig, AutointerpTasks,
                                              LocalLLMServerConfig, AUTOINTERP_SOURCES, AutointerpConfig, ReportConfig)  # noqa: F401
from rank1_core.config.loader import (Config, _is_optional, _coerce, RENAMED_KEYS, MOVED_SECTIONS, _from_dict,
                                      _set_dotted, parse_override, _blame_override, config_from_dict, load_config,
                                      section_hash, dump_yaml)  # noqa: F401
