"""fastclip: CLIP pretraining for throughput (DALI, DeepSpeed ZeRO, a fused contrastive loss)."""

import os as _os

__version__ = "0.1.0"

# Installed, setup.py maps the top-level kernels/ to fastclip.kernels. Run from a source checkout without
# installing (PYTHONPATH=., as benchmarks/gpu_suite.sh does on a bare GPU machine), let the same import work.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _os.path.isfile(
    _os.path.join(_root, "setup.py")
):
    __path__.append(_root)  # noqa: F821 (a package's __path__)
