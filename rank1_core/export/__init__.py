"""Exports of a finished run into the formats other interpretability tools read.

- ``saelens``     the cross-layer SAE as a SAELens JumpReLU SAE (``cfg.json``,
                  ``sae_weights.safetensors``, ``sparsity.safetensors``)
- ``neuronpedia`` every explained feature in Neuronpedia's export/import batch layout
- ``atomic``      the destination check; the folder is built under a temporary name and renamed
                  when complete (``rank1_core.rundir.atomic_dir``)

``rank1 export sae|neuronpedia ...`` (``ray_jobs/export.py``) is the command line. No ray here.
"""

from rank1_core.export.atomic import ExportError, check_destination

__all__ = ["ExportError", "check_destination"]
