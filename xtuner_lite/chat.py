"""Multi-turn chat with a model (and optional LoRA adapter), stopping at the template's end of turn.

Generation goes through ``transformers.generate`` for now; the bundled engine replaces it later
behind the same :class:`ChatSession` interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xtuner_lite.data.templates import Template, get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import default_template_for, load_model, load_tokenizer


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


def adapter_template(adapter: str | Path) -> str | None:
    """The template an adapter was trained with, recorded beside it by ``xtuner train``."""
    meta = Path(adapter) / "xtuner_lite.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("template")
    return None


class ChatSession:
    """Holds the model, template and conversation history; ``ask`` returns the reply."""

    def __init__(self, model: str, adapter: str | None = None, template: str | None = None,
                 system: str | None = None, options: GenerationOptions | None = None):
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model)
        if adapter:
            from peft import PeftModel

            if not Path(adapter).is_dir():
                raise XtunerError(f"adapter folder {adapter} does not exist")
            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()
        name = template or (adapter_template(adapter) if adapter else None) \
            or default_template_for(model) or "auto"
        self.template: Template = get_template(name, self.tokenizer)
        self.system = system
        self.options = options or GenerationOptions()
        self.history: list[dict[str, str]] = []
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = stop_token_ids(self.template, self.tokenizer)
        self.stop_strings = [w for w in self.template.stop_words(self.tokenizer) if w not in vocab]

    def reset(self) -> None:
        self.history = []

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": prompt}]

    @torch.no_grad()
    def ask(self, prompt: str, on_text: Callable[[str], Any] | None = None) -> str:
        messages = self._messages(prompt)
        text = self.template.render_prompt(messages, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        opts = self.options
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        sample = opts.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=opts.max_new_tokens, do_sample=sample,
            repetition_penalty=opts.repetition_penalty, eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id or self.stop_ids[0],
        )
        if sample:
            kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        if on_text is not None:
            from transformers import TextStreamer

            class _Callback(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    on_text(text)

            kwargs["streamer"] = _Callback(self.tokenizer, skip_prompt=True,
                                           skip_special_tokens=True)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in self.stop_strings:
            reply = reply.split(stop)[0]
        reply = reply.strip()
        self.history += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": reply}]
        return reply
