"""llguidance (what the engine uses) against xgrammar on our workload: SmolLM2's tokenizer, the
100 seeded JSON schemas of ``bench_grammar.py``, and the replies the embedded model writes under
them.

- The replies: the embedded, untrained SmolLM2-135M-Instruct decodes each schema's reply with our
  llguidance constraint (one continuous batch, greedy); their token ids are the workload.
- Each engine, in its own process, alternating: per schema, the grammar compiled from the JSON
  schema (no cache), then the reply replayed token by token — the next-token bitmask filled,
  the token accepted — timed per token. Both engines are set to the same JSON layout (", " and
  ": ", no free whitespace) and told the same vocabulary.
- Agreement, in this process: at every step of every reply, whether the two engines allow
  exactly the same tokens.

Run: python benchmarks/bench_grammar_engines.py [--schemas 100] [--pairs 3]
Needs ``pip install xgrammar`` (with ``--no-deps`` and ``apache-tvm-ffi`` it runs without
triton, which only its GPU kernels use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llguidance
import torch
from bench_grammar import schema_replies, setup
from random_schemas import schemas
from sides import cpu_name, report, run_side

from xtuner_lite.inference.grammar import allowed_tokens, grammar_tokenizer, json_schema_grammar

XGRAMMAR_LAYOUT = dict(any_whitespace=False, separators=(", ", ": "), strict_mode=True)


def replies(count: int) -> list[list[int]]:
    """Each schema's reply token ids, decoded under our (llguidance) constraint, stop removed."""
    _, requests, stops = schema_replies(count, max_new_tokens=128)
    return [[t for t in r.output_ids if t not in stops] for r in requests]


class Llguidance:
    def __init__(self, tok):
        self.tokenizer = grammar_tokenizer(tok)
        self.bits = torch.zeros((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        return llguidance.LLMatcher(self.tokenizer, json_schema_grammar(schema), log_level=0)

    def mask(self, matcher) -> torch.Tensor:
        matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.nbytes)
        return self.bits

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    def __init__(self, tok):
        import xgrammar  # optional: only this benchmark's other side needs it

        self.xgr = xgrammar
        vocab = grammar_tokenizer(tok).vocab_size  # the same vocabulary as llguidance's
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.bits = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), **XGRAMMAR_LAYOUT)
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher) -> torch.Tensor:
        matcher.fill_next_token_bitmask(self.bits)
        return self.bits[0]

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)


ENGINES = {"llguidance": Llguidance, "xgrammar": Xgrammar}


def side(name: str, count: int, workload: str) -> None:
    """Compile every schema and replay its reply; per-schema compile and per-token times."""
    _, tok, _, _ = setup()
    engine = ENGINES[name](tok)
    sequences = json.loads(open(workload).read())
    compile_ms, token_us, accepted, total = [], [], 0, 0
    for schema, tokens in zip(schemas(count, seed=0), sequences):
        start = time.perf_counter()
        matcher = engine.compile(schema)
        compile_ms.append((time.perf_counter() - start) * 1e3)
        for token in tokens:
            start = time.perf_counter()
            engine.mask(matcher)
            ok = engine.accept(matcher, token)
            token_us.append((time.perf_counter() - start) * 1e6)
            total += 1
            if not ok:
                break
            accepted += 1
    report({"compile_ms": compile_ms, "token_us": token_us, "accepted": accepted, "total": total})


def agreement(count: int, sequences: list[list[int]]) -> tuple[int, int]:
    """Steps at which both engines allow exactly the same tokens, of all replayed steps."""
    _, tok, _, _ = setup()
    ours, theirs = Llguidance(tok), Xgrammar(tok)
    vocab = ours.tokenizer.vocab_size
    same = steps = 0
    for schema, tokens in zip(schemas(count, seed=0), sequences):
        a, b = ours.compile(schema), theirs.compile(schema)
        for token in tokens:
            allowed = [
                allowed_tokens(engine.mask(m), vocab) for engine, m in ((ours, a), (theirs, b))
            ]
            same += bool(torch.equal(*allowed))
            steps += 1
            if not (ours.accept(a, token) and theirs.accept(b, token)):
                break
    return same, steps


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--side", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        side(opts.side, opts.schemas, opts.workload)
        return
    print(f"bench_grammar_engines on {cpu_name()}")
    sequences = replies(opts.schemas)
    print(f"workload: {len(sequences)} replies, {sum(map(len, sequences))} tokens")
    same, steps = agreement(opts.schemas, sequences)
    print(f"the same allowed tokens at {same}/{steps} steps")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sequences, f)
    results: dict[str, list[dict]] = {name: [] for name in ENGINES}
    for pair in range(opts.pairs):
        for name in ENGINES if pair % 2 == 0 else reversed(ENGINES):
            cmd = [sys.executable, __file__, "--side", name, "--schemas", str(opts.schemas),
                   "--workload", f.name]  # fmt: skip
            results[name].append(run_side(cmd, name))
    os.unlink(f.name)
    print(f"{'engine':<12}{'compile ms p50':>16}{'p95':>8}{'mask+accept µs p50':>20}{'p95':>8}"
          f"{'tokens accepted':>18}")  # fmt: skip
    for name, runs in results.items():
        compile_p50 = statistics.median(statistics.median(r["compile_ms"]) for r in runs)
        compile_p95 = statistics.median(_p(r["compile_ms"], 95) for r in runs)
        token_p50 = statistics.median(statistics.median(r["token_us"]) for r in runs)
        token_p95 = statistics.median(_p(r["token_us"], 95) for r in runs)
        print(f"{name:<12}{compile_p50:>16.2f}{compile_p95:>8.2f}{token_p50:>20.1f}"
              f"{token_p95:>8.1f}{runs[0]['accepted']:>11}/{runs[0]['total']}")  # fmt: skip


if __name__ == "__main__":
    main()
