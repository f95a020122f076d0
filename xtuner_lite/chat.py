"""Multi-turn chat with a model (and optional LoRA adapter), stopping at the template's end of turn.

Generation runs on the bundled :class:`~xtuner_lite.inference.InferenceEngine`; old turns are
dropped from the prompt when the conversation outgrows the model's context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xtuner_lite.data.templates import Template, get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import default_template_for, load_model, load_tokenizer
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.merge import load_adapted


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


def _quantization(bits: int | None) -> dict[str, Any]:
    """from_pretrained kwargs for 4/8-bit weights through bitsandbytes (None: full precision)."""
    if bits is None:
        return {}
    if bits not in (4, 8):
        raise XtunerError(f"--bits must be 4 or 8, got {bits}")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True,
                                                          bnb_4bit_quant_type="nf4")}
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}


class ChatSession:
    """Holds the model, template and conversation history; ``ask`` returns the reply."""

    def __init__(self, model: str, adapter: str | None = None, template: str | None = None,
                 system: str | None = None, options: GenerationOptions | None = None,
                 bits: int | None = None):
        trained_with = None
        if adapter:  # the template recorded beside the adapter by ``xtuner train`` is the default
            self.model, self.tokenizer, meta = load_adapted(model, adapter, any_base=True,
                                                            **_quantization(bits))
            trained_with = meta.get("template")
        else:
            self.tokenizer = load_tokenizer(model)
            self.model = load_model(model, **_quantization(bits)).eval()
        name = template or trained_with or default_template_for(model) or "auto"
        self.template: Template = get_template(name, self.tokenizer)
        self.system = system
        self.options = options or GenerationOptions()
        self.history: list[dict[str, str]] = []
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = stop_token_ids(self.template, self.tokenizer)
        self.stop_strings = [w for w in self.template.stop_words(self.tokenizer) if w not in vocab]
        self.engine = InferenceEngine(self.model, self.tokenizer)

    def reset(self) -> None:
        self.history = []

    def _messages(self, prompt: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + history + [{"role": "user", "content": prompt}]

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Render the conversation, dropping the oldest exchanges until it fits the context."""
        history = list(self.history)
        limit = self.engine.context_length
        while True:
            text = self.template.render_prompt(self._messages(prompt, history), self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if limit is None or len(ids) + self.options.max_new_tokens <= limit or not history:
                return ids
            history = history[2:]

    def ask(self, prompt: str, on_text: Callable[[str], Any] | None = None) -> str:
        opts = self.options
        params = SamplingParams(
            max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
            top_k=opts.top_k, repetition_penalty=opts.repetition_penalty, seed=opts.seed,
            stop_token_ids=self.stop_ids, stop_words=self.stop_strings)
        streamed = [0]

        def stream(request, _token: int) -> None:
            text = self.engine.decode(request)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text[streamed[0]:])
                streamed[0] = len(text)

        request = self.engine.add_request(self._prompt_ids(prompt), params,
                                          on_token=stream if on_text is not None else None)
        while not request.finished:
            self.engine.step()
        reply = self.engine.decode(request)
        if on_text is not None and len(reply) > streamed[0]:
            on_text(reply[streamed[0]:])
        reply = reply.strip()
        self.history += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": reply}]
        return reply
