"""Stage 3: chat templates render a conversation as text segments, each marked trained or not.

One registry holds our templates; ``auto`` wraps the tokenizer's own jinja template. Rendering to
(text, trained) segments, rather than tokens, lets the tokenizer see the whole string at once, so
training tokenization is exactly what the model sees at inference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from xtuner_lite.data.map_fns import is_trained
from xtuner_lite.errors import XtunerError, did_you_mean
from xtuner_lite.toolcalling.formats import (
    HERMES_CALL_HINT,
    HERMES_INSTRUCTIONS,
    call_ids,
    get_tool_format,
    split_system,
)

Segment = tuple[str, bool]  # (text, trained)


class Template(Protocol):
    name: str
    tool_format: str  # how tools and calls are written: a name in tools.formats.TOOL_FORMATS

    def render(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> list[Segment]: ...

    def render_prompt(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> str: ...

    def stop_words(self, tokenizer: Any = None) -> list[str]: ...


def _special(tokenizer: Any, name: str) -> str:
    token = getattr(tokenizer, f"{name}_token", None) if tokenizer is not None else None
    if not token:
        raise XtunerError(f"this template needs the tokenizer's {name} token, which is not set")
    return token


# an assistant turn in the hermes format: its text, then each tool call as a <tool_call> block
HERMES_ASSISTANT_JINJA = (
    "{%- set ns.body = m.content or '' -%}"
    "{%- for c in (m.tool_calls or []) -%}"
    "{%- set f = c.function if c.function is defined else c -%}"
    "{%- set ns.body = ns.body + ('\\n' if ns.body else '') + "
    '\'<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' + '
    "(f.arguments if f.arguments is string else f.arguments | tojson) + "
    "'}\\n</tool_call>' -%}"
    "{%- endfor -%}{{ ns.body }}"
)


def _jinja_expr(fmt: str, content: str = "") -> str:
    """A template format string (``{bos}``, ``{content}`` ...) as a jinja expression."""
    parts = []
    for piece in re.split(r"(\{bos\}|\{eos\}|\{content\}|\{system\})", fmt):
        var = {
            "{bos}": "bos_token",
            "{eos}": "eos_token",
            "{content}": content,
            "{system}": "ns.system",
        }.get(piece)
        if var is None and piece:
            parts.append(json.dumps(piece))
        elif var:
            parts.append(var)
    return " + ".join(parts) or '""'


def _jinja_out(fmt: str, content: str = "") -> str:
    return "{{ " + _jinja_expr(fmt, content) + " }}"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format written as plain strings; ``{content}``, ``{bos}``, ``{eos}`` are filled in.

    ``assistant`` is the generation prompt (never trained); ``eot`` ends an assistant turn and is
    trained with it; ``separator`` follows ``eot`` and is not trained. Templates whose model has no
    system role fold the system prompt into the first user turn with ``system_in_user``.
    ``tools_system`` replaces ``system`` when the conversation is given tools (Llama-3.1 then
    announces ``Environment: ipython``).
    """

    name: str
    user: str
    assistant: str
    eot: str
    system: str | None = None
    separator: str = ""
    tool: str | None = None
    prefix: str = ""
    default_system: str | None = None
    system_in_user: str | None = None
    stops: tuple[str, ...] = field(default_factory=tuple)
    tool_format: str = "react"
    tools_system: str | None = None

    def _fill(self, fmt: str, tokenizer: Any, content: str = "") -> str:
        if "{bos}" in fmt:
            fmt = fmt.replace("{bos}", _special(tokenizer, "bos"))
        if "{eos}" in fmt:
            fmt = fmt.replace("{eos}", _special(tokenizer, "eos"))
        return fmt.replace("{content}", content)

    def render(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> list[Segment]:
        if len(messages) == 1 and messages[0]["role"] == "text":  # plain-text pretraining
            return [(messages[0]["content"] + _special(tokenizer, "eos"), True)]
        messages = get_tool_format(self.tool_format).rewrite(messages, tools, self.default_system)
        system, rest = split_system(messages, self.default_system)
        segments: list[Segment] = []
        if self.prefix:
            segments.append((self._fill(self.prefix, tokenizer), False))
        if system is not None and self.system_in_user is None:
            system_fmt = self.tools_system if tools and self.tools_system else self.system
            segments.append((self._fill(system_fmt or "", tokenizer, system), False))
        pending_system = system if self.system_in_user is not None else None
        for msg in rest:
            role, content = msg["role"], msg["content"]
            if role == "raw":  # a tool format's own turn, written as it is
                segments.append((content, False))
                continue
            if role == "assistant":
                segments.append((self._fill(self.assistant, tokenizer), False))
                trained = is_trained(msg)
                segments.append((content + self._fill(self.eot, tokenizer), trained))
                if self.separator:
                    segments.append((self.separator, False))
                continue
            if role == "user" and pending_system is not None:
                content = self.system_in_user.format(system=pending_system, content=content)
                pending_system = None
            fmt = {"user": self.user, "tool": self.tool or self.user, "system": self.system}[role]
            if fmt is None:
                raise XtunerError(f"template {self.name!r} has no {role} role")
            segments.append((self._fill(fmt, tokenizer, content), is_trained(msg)))
        return segments

    def render_prompt(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> str:
        text = "".join(t for t, _ in self.render(messages, tokenizer, tools))
        return text + self._fill(self.assistant, tokenizer)

    def stop_words(self, tokenizer: Any = None) -> list[str]:
        words = [self._fill(s, tokenizer) for s in self.stops]
        return list(dict.fromkeys(w for w in words if w))

    def to_jinja(self) -> str:
        """The same format as a Hugging Face ``chat_template``, so a merged model's tokenizer
        renders prompts exactly as training did (``apply_chat_template`` == ``render_prompt``)."""
        if self.tool_format == "mistral":
            raise XtunerError(
                f"template {self.name!r} places the system prompt and tools by the last user "
                "turn; it is not written as jinja here (a merge keeps the base tokenizer's own "
                "template when that renders the same)"
            )
        hermes = self.tool_format == "hermes"
        if hermes and (self.system is None or self.system_in_user is not None):
            raise XtunerError(f"template {self.name!r}: the hermes tool format needs a system role")
        return "".join(self._jinja_preamble(hermes) + self._jinja_turns(hermes))

    def _jinja_no_role(self) -> str:
        return "{{ raise_exception('template " + self.name + " has no ' + m.role + ' role') }}"

    def _jinja_preamble(self, hermes: bool) -> list[str]:
        """The system prompt (given, or the default) and the prefix; with its own role, the
        system turn (hermes: with the tools)."""
        out = _jinja_out
        default = json.dumps(self.default_system) if self.default_system is not None else "none"
        lines = [
            "{%- set ns = namespace(system=" + default + ", start=0, body='') -%}",
            "{%- if messages and messages[0].role == 'system' -%}",
            "{%- set ns.system = messages[0].content -%}{%- set ns.start = 1 -%}",
            "{%- endif -%}",
            out(self.prefix) if self.prefix else "",
        ]
        if self.system_in_user is None:
            lines.append(
                (self._jinja_tools_system(out) if hermes else "")
                + "{%- if ns.system is not none -%}"
                + (out(self.system, "ns.system") if self.system else self._jinja_no_role())
                + "{%- endif -%}"
                + ("{%- endif -%}" if hermes else "")
            )
        return lines

    def _jinja_turns(self, hermes: bool) -> list[str]:
        """Every message after the system prompt by its role, then the generation prompt."""
        out, no_role = _jinja_out, self._jinja_no_role()
        lines = [
            "{%- for m in messages[ns.start:] -%}",
            "{%- if m.role == 'assistant' -%}"
            + out(self.assistant)
            + (HERMES_ASSISTANT_JINJA if hermes else "{{ m.content }}")
            + out(self.eot)
            + (out(self.separator) if self.separator else ""),
        ]
        if self.system_in_user is not None:
            lines.append(
                "{%- elif m.role == 'user' and ns.system is not none -%}"
                + out(self.user, "(" + _jinja_expr(self.system_in_user, "m.content") + ")")
                + "{%- set ns.system = none -%}"
            )
        tool = TOOL_RESULT_JINJA.get(self.tool_format, "m.content")
        lines += [
            "{%- elif m.role == 'user' -%}" + out(self.user, "m.content"),
            "{%- elif m.role == 'tool' -%}"
            + (self._jinja_tool_results(out) if hermes else out(self.tool or self.user, tool)),
            "{%- elif m.role == 'system' -%}"
            + (out(self.system, "m.content") if self.system else no_role),
            "{%- else -%}" + no_role,
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + out(self.assistant) + "{%- endif -%}",
        ]
        return lines

    def _jinja_tools_system(self, out) -> str:
        """Opens ``{% if tools %}``: the system turn with the tool list (hermes), else the
        caller's plain system turn follows and closes the block."""
        before, after = self.system.split("{content}")
        return (
            "{%- if tools -%}"
            + out(before)
            + "{%- if ns.system is not none -%}{{ ns.system + '\\n\\n' }}{%- endif -%}"
            + out(HERMES_INSTRUCTIONS)
            + "{%- for t in tools -%}{{ '\\n' + (t | tojson) }}{%- endfor -%}"
            + out(HERMES_CALL_HINT)
            + out(after)
            + "{%- else -%}"
        )

    def _jinja_tool_results(self, out) -> str:
        """Consecutive tool messages as one user turn of <tool_response> blocks (hermes)."""
        before, after = self.user.split("{content}")
        return (
            "{%- if loop.previtem is defined and loop.previtem.role == 'tool' -%}{{ '\\n' }}"
            + "{%- else -%}"
            + out(before)
            + "{%- endif -%}"
            + "{{ '<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
            + "{%- if not (loop.nextitem is defined and loop.nextitem.role == 'tool') -%}"
            + out(after)
            + "{%- endif -%}"
        )


LLAMA3_1_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\n{env}Cutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{content}<|eot_id|>"
)

# a tool result as a format writes it in jinja (Llama-3.1 JSON-encodes it)
TOOL_RESULT_JINJA = {"llama3_json": "(m.content | tojson)"}

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n",
    eot="<|im_end|>",
    separator="\n",
    stops=("<|im_end|>",),
    tool_format="hermes",
)

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(name="chatml", **_CHATML),
    "smollm2": ChatTemplate(
        name="smollm2",
        **_CHATML,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ),
    "qwen2_5": ChatTemplate(
        name="qwen2_5",
        **_CHATML,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    # Qwen3 in its non-thinking mode: every reply opens with the empty think block its template
    # writes for enable_thinking=False (untrained, part of the prompt), so the model answers
    # without reasoning first
    "qwen3": ChatTemplate(
        name="qwen3",
        **{**_CHATML, "assistant": "<|im_start|>assistant\n<think>\n\n</think>\n\n"},
    ),
    "internlm2_chat": ChatTemplate(
        name="internlm2_chat",
        prefix="{bos}",
        **{
            **_CHATML,
            "tool": "<|im_start|>environment name=<|plugin|>\n{content}<|im_end|>\n",
            "tool_format": "internlm",
        },
    ),
    "llama2_chat": ChatTemplate(
        name="llama2_chat",
        user="{bos}[INST] {content} [/INST]",
        assistant=" ",
        eot=" {eos}",
        system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        stops=("{eos}",),
    ),
    "llama3_chat": ChatTemplate(
        name="llama3_chat",
        prefix="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        eot="<|eot_id|>",
        stops=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "llama3_1_chat": ChatTemplate(
        name="llama3_1_chat",
        prefix="{bos}",
        system=LLAMA3_1_SYSTEM.replace("{env}", ""),
        tools_system=LLAMA3_1_SYSTEM.replace("{env}", "Environment: ipython\n"),
        default_system="",  # Llama-3.1 always opens with its dated system turn
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        eot="<|eot_id|>",
        stops=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        tool_format="llama3_json",
    ),
    # Mistral-7B-Instruct-v0.3 (v3 tokenizer): the tool format also places the system prompt and
    # the space before each reply, as its chat template does
    "mistral_v3": ChatTemplate(
        name="mistral_v3",
        prefix="{bos}",
        user="[INST] {content}[/INST]",
        assistant="",
        eot="{eos}",
        stops=("{eos}",),
        tool_format="mistral",
    ),
    "mistral": ChatTemplate(
        name="mistral",
        prefix="{bos}",
        user="[INST] {content} [/INST]",
        assistant="",
        eot="{eos}",
        system_in_user="{system}\n\n{content}",
        stops=("{eos}",),
    ),
    "gemma": ChatTemplate(
        name="gemma",
        prefix="{bos}",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant="<start_of_turn>model\n",
        eot="<end_of_turn>",
        separator="\n",
        system_in_user="{system}\n\n{content}",
        stops=("<end_of_turn>", "{eos}"),
    ),
    "phi3": ChatTemplate(
        name="phi3",
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n",
        assistant="<|assistant|>\n",
        eot="<|end|>",
        separator="\n",
        stops=("<|end|>", "<|endoftext|>"),
    ),
    "default": ChatTemplate(
        name="default",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        tool="### Tool output:\n{content}\n\n",
        assistant="### Response:\n",
        eot="{eos}",
        separator="\n\n",
        stops=("{eos}",),
    ),
}


# how a tokenizer's jinja template shows which tool format it writes (first match wins)
JINJA_TOOL_MARKS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|action_start|>", "internlm"),
    ('"parameters": ', "llama3_json"),
)


class JinjaTemplate:
    """``auto``: the tokenizer's own jinja chat template, segmented by incremental rendering.

    The text an assistant turn adds is found by rendering the conversation up to that turn with and
    without the generation prompt; it is trained up to and including the first stop word.
    """

    name = "auto"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise XtunerError(
                "template 'auto' needs a tokenizer with a chat_template; "
                f"this one has none. Pick one of {sorted(TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        source = tokenizer.chat_template
        source = source if isinstance(source, str) else json.dumps(source)
        # a template that reads ``tools`` renders them itself; otherwise tools go through ReAct
        self.native_tools = "tools" in source
        self.tool_format = next((f for mark, f in JINJA_TOOL_MARKS if mark in source), "react")

    def _apply(
        self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None
    ) -> str:
        plain = [_jinja_message(m, ids) for m, ids in zip(messages, call_ids(messages))]
        return self.tokenizer.apply_chat_template(
            plain, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _structured(
        self, messages: list[dict], tools: list[dict] | None
    ) -> tuple[list[dict], list[dict] | None]:
        """Messages and tools for the jinja template: as they are where it renders tools
        itself, else rewritten in the ReAct format."""
        if self.native_tools:
            return messages, tools
        return get_tool_format("react").rewrite(messages, tools, None), None

    def render(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> list[Segment]:
        if len(messages) == 1 and messages[0]["role"] == "text":
            return [(messages[0]["content"] + _special(self.tokenizer, "eos"), True)]
        messages, tools = self._structured(messages, tools)
        full = self._apply(messages, False, tools)
        stops = self.stop_words()
        segments: list[Segment] = []
        pos = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], True, tools) if i else ""
            upto = self._apply(messages[: i + 1], False, tools)
            if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= pos):
                raise XtunerError(
                    "the tokenizer's chat template does not render conversations "
                    "prefix by prefix, so assistant turns cannot be located; pass "
                    f"an explicit template, one of {sorted(TEMPLATES)}"
                )
            turn = upto[len(prompt) :]
            start = turn.find(msg["content"])
            dropped = start < 0 and msg.get("tool_calls")  # a call's text, as Mistral drops it
            start, content = (0, "") if dropped else (start, msg["content"])
            if start < 0:
                raise XtunerError(
                    "the tokenizer's chat template changes assistant content "
                    "(e.g. strips it); pass an explicit template"
                )
            end = start + len(content)
            found = [(turn.find(s, end), s) for s in stops if turn.find(s, end) >= 0]
            if found:
                stop_pos, stop = min(found)
                end = stop_pos + len(stop)
            else:
                end = len(turn)
            segments.append((full[pos : len(prompt) + start], False))
            segments.append((turn[start:end], is_trained(msg)))
            pos = len(prompt) + end
        segments.append((full[pos:], False))
        return [s for s in segments if s[0]]

    def render_prompt(
        self, messages: list[dict], tokenizer: Any = None, tools: list[dict] | None = None
    ) -> str:
        messages, tools = self._structured(messages, tools)
        return self._apply(messages, True, tools)

    def stop_words(self, tokenizer: Any = None) -> list[str]:
        tok = self.tokenizer
        words = [tok.eos_token] if tok.eos_token else []
        eos_ids = getattr(getattr(tok, "generation_config", None), "eos_token_id", None)
        for tid in eos_ids if isinstance(eos_ids, list) else []:
            words.append(tok.convert_ids_to_tokens(tid))
        return list(dict.fromkeys(words))


def _jinja_message(msg: dict, ids: list[str] | str | None) -> dict:
    """A message as chat templates read it: OpenAI-style ``tool_calls`` when it has calls, with
    call ids (Mistral's template requires them)."""
    out = {"role": msg["role"], "content": msg["content"]}
    if msg.get("tool_calls"):
        out["tool_calls"] = [
            {
                "type": "function",
                "id": i,
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c, i in zip(msg["tool_calls"], ids)
        ]
    elif msg["role"] == "tool":
        out["tool_call_id"] = ids
    return out


PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}
PROBES = (  # (conversation, tools): what a tokenizer's own template must render as ours does
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Define 'ox'."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"name": "lookup", "arguments": {"word": "ox"}}]},
            {"role": "tool", "content": "a bovine"},
            {"role": "assistant", "content": "A bovine."},
        ],
        [PROBE_TOOL],
    ),
)  # fmt: skip


def renders_like(template: Template, tokenizer: Any) -> bool:
    """Whether the tokenizer's own jinja template renders the probe conversations (plain, and
    with a tool call and its result) exactly as ``template`` does, prompts and whole turns."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    own = JinjaTemplate(tokenizer)
    try:
        for conv, tools in PROBES:
            for end in range(2, len(conv) + 1):
                part = conv[:end]
                if part[-1]["role"] != "assistant":
                    if own._apply(part, True, tools) != template.render_prompt(
                        part, tokenizer, tools
                    ):
                        return False
                elif own._apply(part, False, tools) != "".join(
                    t for t, _ in template.render(part, tokenizer, tools)
                ):
                    return False
    except Exception:  # noqa: BLE001 - any template that fails a probe is not the same one
        return False
    return True


def stop_token_ids(template: Template, tokenizer: Any) -> list[int]:
    """Token ids that end generation: the template's stop words that are single tokens, + EOS."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[w] for w in template.stop_words(tokenizer) if w in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def get_template(name: str | Template, tokenizer: Any = None) -> Template:
    """Look up a template by name (``auto`` needs the tokenizer), or pass one through."""
    if not isinstance(name, str):
        return name
    if name == "auto":
        return JinjaTemplate(tokenizer)
    if name not in TEMPLATES:
        raise XtunerError(
            f"unknown chat template {name!r}"
            + did_you_mean(name, TEMPLATES)
            + f" (known: auto, {', '.join(sorted(TEMPLATES))})"
        )
    return TEMPLATES[name]
