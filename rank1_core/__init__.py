"""rank1: what a reasoning fine-tune changed, read through a rank-1 LoRA.

The library half of rank1. It never imports `ray`, so every function here can be called
and tested directly; the Ray glue lives in `ray_jobs`.
"""

__version__ = "0.1.0"
