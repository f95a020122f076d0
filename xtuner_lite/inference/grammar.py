"""Grammar-constrained decoding: a token mask per step that only lets a reply follow a grammar.

We use llguidance (the engine behind llama.cpp's, vLLM's and SGLang's guidance backends) rather
than xgrammar: it allows only the canonical tokenization of text a grammar forces, compiles a
schema faster, and is one dependency-free wheel, where xgrammar's Linux wheel requires triton (a
GPU compiler) and tvm-ffi (``benchmarks/bench_grammar_engines.py`` compares the two). A grammar
is compiled once per request (a JSON schema, or Lark with embedded JSON schemas for a tool call);
each step the matcher fills a bitmask of the tokens that keep the reply inside the grammar, the
sampler sees only those, and the chosen token advances the matcher.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.hf
import torch

from xtuner_lite.errors import UsageError

ANY_JSON_OBJECT = {"type": "object"}
# JSON written as json.dumps writes it, with no room for free whitespace: an untrained model
# would otherwise fill a document with newlines until its token budget ends; unsupported
# keywords are errors, never ignored
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "lenient": False}  # fmt: skip
BIT_SHIFTS = torch.arange(32, dtype=torch.int32)  # unpacks a 32-bit word of a token bitmask
_ARGS = {"xtuner_arguments": 0}  # placeholder arguments when reading a format's call shape


class GrammarError(UsageError):
    """A schema or grammar that cannot be enforced (an unsupported feature, named)."""


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a transformers tokenizer (built once: it walks the vocabulary)."""
    return llguidance.hf.from_tokenizer(tokenizer)


def json_schema_grammar(schema: dict) -> str:
    """A grammar for JSON documents valid under ``schema``."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def tool_call_grammar(call_text, tools: list[dict], name: str, prefill: str) -> str:
    """A grammar for the rest of a tool call after ``prefill`` (the reply's forced start),
    written as ``call_text`` (a tool format's renderer) writes one: the named tool's, or any
    tool's (``name`` ""), with arguments valid under that tool's ``parameters``."""
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + _call_rule(call_text, tools, name, prefill) + "\n"
    )


def auto_tool_grammar(call_text, tools: list[dict], opener: str) -> str:
    """``tool_choice: auto``: free text without ``opener`` (the start of any call), or text
    up to ``opener`` and then one call as :func:`tool_call_grammar` constrains it: the model
    chooses, and a call, once started, is valid."""
    text = f"/(?s:.*)/ & ~/(?s:.*{_regex_literal(opener)}.*)/"
    return llguidance.LLMatcher.grammar_from_lark(
        f"start: TEXT | lead call\nTEXT: {text}\nlead[stop={json.dumps(opener)}]: /(?s:.*)/\n"
        f"call: {_call_rule(call_text, tools, '', opener)}\n"
    )


def _regex_literal(text: str) -> str:
    """``text`` matched literally inside a Lark ``/regex/`` (Rust regex syntax)."""
    out = ""
    for ch in text:
        if ch == "\n":
            out += "\\n"
        elif ch in "\\.+*?()|[]{}^$#&-~/":
            out += "\\" + ch
        else:
            out += ch
    return out


def _call_rule(call_text, tools: list[dict], name: str, prefill: str) -> str:
    """The Lark alternatives of the rest of a call after ``prefill`` (see above)."""
    branches = []
    for tool in tools:
        function = tool["function"]
        if name and function["name"] != name:
            continue
        text = call_text({"name": function["name"], "arguments": _ARGS})
        if not text.startswith(prefill):
            raise GrammarError(f"the tool format's call does not start with {prefill!r}")
        before, _, after = text[len(prefill) :].partition(json.dumps(_ARGS, ensure_ascii=False))
        schema = {**(function.get("parameters") or ANY_JSON_OBJECT), "x-guidance": JSON_OPTIONS}
        branches.append(f"{json.dumps(before)} %json {json.dumps(schema)} {json.dumps(after)}")
    return "\n    | ".join(branches)


def check_grammar(grammar: str, tokenizer=None) -> None:
    """Raise :class:`GrammarError` naming what the grammar cannot enforce. With a tokenizer the
    grammar is compiled for it and kept (``_compiled``): a server checks a request on its own
    thread, and the engine's thread then starts the request from a copy."""
    if tokenizer is not None:
        _compiled(grammar, tokenizer)
        return
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if failed:
        raise GrammarError("; ".join(messages))


@functools.lru_cache(maxsize=64)
def _compiled(grammar: str, tokenizer) -> llguidance.LLMatcher:
    """A matcher at the start of ``grammar``, compiled once: requests with the same schema or
    tools (the usual case for a server) each start from a copy instead of compiling again."""
    matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return matcher


def allowed_tokens(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """A token bitmask (32-bit words, token i at bit i % 32 of word i // 32) as one bool per
    token of ``vocab``."""
    return ((bits.reshape(-1)[:, None] >> BIT_SHIFTS) & 1).reshape(-1)[:vocab].bool()


@functools.lru_cache(maxsize=4)
def digit_tokens(tokenizer) -> tuple[torch.Tensor, list[int]]:
    """(which tokens are digits only, each token's count of trailing digits), by token id."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    trailing = [len(t) - len(t.rstrip("0123456789")) for t in texts]
    only = torch.tensor([n > 0 and n == len(t) for n, t in zip(trailing, texts)])
    return only, trailing


class Constraint:
    """One request's matcher: which tokens may come next, and the tokens chosen so far.

    A run of digits is capped at ``MAX_DIGITS``, as llama.cpp's JSON grammar caps a number's
    parts: the grammar allows a number of any length, and a model in a loop (an untrained one
    readily) writes digits until its token budget ends, leaving a document that never closes.
    """

    MAX_DIGITS = 16

    def __init__(self, grammar: str, tokenizer):
        self.matcher = _compiled(grammar, tokenizer).deep_copy()
        self.vocab = grammar_tokenizer(tokenizer).vocab_size
        self._bits = torch.zeros(1, (self.vocab + 31) // 32, dtype=torch.int32)
        self._digits, self._trailing = digit_tokens(tokenizer)
        self._run = 0  # digits at the end of the output so far

    def mask(self, logits: torch.Tensor, stop_ids: list[int]) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf (``logits``: one
        row); once the grammar is complete, the request's stop tokens are allowed too."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.nbytes)
        allowed = allowed_tokens(self._bits, self.vocab)
        if self.matcher.is_accepting():
            allowed[[i for i in stop_ids if i < self.vocab]] = True
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[: self.vocab] = allowed
        if self._run >= self.MAX_DIGITS:
            keep[: len(self._digits)] &= ~self._digits
        logits.masked_fill_(~keep.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """The chosen token; a token the grammar refuses raises (it was masked out)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")
        if token < len(self._trailing):
            digits = self._trailing[token]
            self._run = self._run + digits if bool(self._digits[token]) else digits

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more (a closed JSON document, a finished call)."""
        return self.matcher.is_stopped()


__all__ = [
    "Constraint",
    "allowed_tokens",
    "GrammarError",
    "auto_tool_grammar",
    "check_grammar",
    "grammar_tokenizer",
    "json_schema_grammar",
    "tool_call_grammar",
]
