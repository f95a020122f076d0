"""``--backend lmdeploy``: LMDeploy's pipeline as the GPU generator behind ``xtuner chat``.

We render the prompt with our own template and hand LMDeploy the finished text (its ``base``
template passes text through), with our stop ids and stop words, so a model chats and stops the
same on both backends. LMDeploy needs a CUDA GPU and its own CUDA torch: it is an optional extra
(requirements/lmdeploy.txt) installed in a separate environment, never in the test one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xtuner_lite.errors import XtunerError


def require_lmdeploy() -> None:
    """Raise a clear error unless lmdeploy is importable and a CUDA GPU is visible."""
    try:
        import lmdeploy  # noqa: F401
    except ImportError:
        raise XtunerError(
            "--backend lmdeploy needs LMDeploy, which is not installed; install it "
            "in a CUDA environment with `pip install -r requirements/lmdeploy.txt`"
            " (or use the default --backend torch)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise XtunerError(
            "--backend lmdeploy needs a CUDA GPU and none is visible; use the "
            "default --backend torch, which also runs on CPU"
        )


class LMDeployGenerator:
    """Streams text deltas for a rendered prompt through ``lmdeploy.pipeline``."""

    def __init__(self, model_path: str, adapter: str | None = None):
        require_lmdeploy()
        from lmdeploy import ChatTemplateConfig, PytorchEngineConfig, pipeline

        # LoRA adapters are served unmerged by LMDeploy's PyTorch engine
        backend = PytorchEngineConfig(adapters={"adapter": adapter}) if adapter else None
        self.adapter_name = "adapter" if adapter else None
        self.pipe = pipeline(
            model_path,
            backend_config=backend,
            chat_template_config=ChatTemplateConfig(model_name="base"),
        )

    def stream(
        self, prompt: str, options: Any, stop_token_ids: list[int], stop_words: list[str]
    ) -> Iterator[str]:
        from lmdeploy import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.temperature > 0,
            temperature=options.temperature or 1.0,
            top_p=options.top_p,
            top_k=options.top_k,
            repetition_penalty=options.repetition_penalty,
            random_seed=options.seed,
            stop_token_ids=stop_token_ids,
            stop_words=stop_words or None,
            skip_special_tokens=True,
        )
        kwargs = {"adapter_name": self.adapter_name} if self.adapter_name else {}
        for response in self.pipe.stream_infer([prompt], gen_config=config, **kwargs):
            if response.text:
                yield response.text
