"""Keep DeepSpeed's import quiet on machines without CUDA.

Once DeepSpeed is installed, mmengine's optimizer registry imports it in every command, and its
accelerator detection prints a warning to stdout when no CUDA device exists: into the output
that scripts parse. Naming the CPU accelerator before that import keeps it quiet.
"""

from __future__ import annotations

import importlib.util
import os


def name_cpu_accelerator() -> None:
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch  # only once DeepSpeed is known to be installed

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
