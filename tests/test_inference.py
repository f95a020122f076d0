"""The bundled engine: same greedy tokens as transformers, continuous batching, sampling rules."""

import pytest
import torch

from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.inference import InferenceEngine, SamplingParams, skinny
from xtuner_lite.inference.block_manager import BLOCK_SIZE, BlockManager, gather
from xtuner_lite.inference.decoder import FastDecoder
from xtuner_lite.inference.sampling import apply_repetition_penalty, choose_token, draw

from conftest import tiny_model

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Hi",
    "Explain gravity in one sentence, please.",
    "Translate 'cat' to German.",
]
NEW = 24


@pytest.fixture(scope="module")
def smol():
    from xtuner_lite.hub import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").eval()
    template = get_template("smollm2")
    prompts = [
        tok(
            template.render_prompt([{"role": "user", "content": q}], tok), add_special_tokens=False
        )["input_ids"]
        for q in QUESTIONS
    ]
    return model, tok, prompts, stop_token_ids(template, tok)


class _Counting(torch.nn.Module):
    """``model`` behind a plain forward (the engine's fallback path), appending the input ids
    of every forward (the prefills) to ``fed``."""

    def __init__(self, model, fed: list):
        super().__init__()
        self.inner, self.config, self.fed = model, model.config, fed

    def forward(self, input_ids, **kwargs):
        self.fed.append(input_ids)
        return self.inner(input_ids=input_ids, **kwargs)


def _hf_greedy(model, prompts, stops, batched):
    """transformers.generate, one by one or as one left-padded batch; cut at the first stop."""
    groups = [prompts] if batched else [[p] for p in prompts]
    outputs = []
    for group in groups:
        width = max(map(len, group))
        ids = torch.tensor([[stops[0]] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            outputs.append(row[:cut])
    return outputs


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_equals_transformers_generate(smol, batched):
    model, tok, prompts, stops = smol
    expected = _hf_greedy(model, prompts, stops, batched)
    engine = InferenceEngine(model, tok)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    got = [r.output_ids for r in engine.generate(prompts, params)]
    assert got == expected
    assert any(len(g) < NEW for g in got) and any(len(g) == NEW for g in got)  # ragged ends


def test_continuous_batching_joins_mid_decode(smol):
    model, tok, prompts, stops = smol
    expected = _hf_greedy(model, prompts, stops, batched=False)
    engine = InferenceEngine(model, tok, max_batch_size=4)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    streamed = {}
    requests = [
        engine.add_request(p, params, on_token=lambda r, t: streamed.setdefault(r.id, []).append(t))
        for p in prompts[:2]
    ]
    for _ in range(5):
        engine.step()
    assert all(len(r.output_ids) == 5 for r in requests)
    requests += [engine.add_request(p, params) for p in prompts[2:]]  # 4 more; batch cap is 4
    batch_sizes = []
    while engine.has_work:
        engine.step()
        batch_sizes.append(len(engine.running))
    assert max(batch_sizes) == 4
    assert [r.output_ids for r in requests] == expected
    assert [streamed[r.id] for r in requests[:2]] == expected[:2]
    assert requests[0].text == tok.decode(expected[0], skip_special_tokens=True)


def test_seeded_sampling_does_not_depend_on_the_batch(smol):
    model, tok, prompts, stops = smol
    params = SamplingParams(
        max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7, stop_token_ids=stops
    )
    alone = InferenceEngine(model, tok).generate(prompts[:1], params)[0].output_ids
    together = InferenceEngine(model, tok).generate(prompts[:3], params)[0].output_ids
    other = (
        InferenceEngine(model, tok)
        .generate(prompts[:1], SamplingParams(**{**params.__dict__, "seed": 8}))[0]
        .output_ids
    )
    assert alone == together
    assert alone != other


def test_stop_words_context_guard_and_cancel(smol):
    model, tok, prompts, stops = smol
    engine = InferenceEngine(model, tok, context_length=len(prompts[0]) + 3)
    r = engine.generate(prompts[:1], SamplingParams(max_new_tokens=50, stop_token_ids=stops))[0]
    assert r.finish_reason == "length" and len(r.output_ids) == 3  # clamped to the context
    with pytest.raises(XtunerError, match="context is"):
        engine.add_request(prompts[0] * 2)
    engine = InferenceEngine(model, tok)
    full = engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW))[0]
    word = full.text.split()[2]
    cut = engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW, stop_words=[word]))[0]
    assert cut.finish_reason == "stop" and word not in cut.text
    assert full.text.startswith(cut.text)
    slow = engine.add_request(prompts[1], SamplingParams(max_new_tokens=NEW))
    engine.step()
    engine.cancel(slow)
    assert engine.step() == [slow] and slow.finish_reason == "cancelled"
    assert not engine.has_work


def test_sampling_rules_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    seen = torch.tensor([3, 5, 5, 17, 99])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits[0], seen, 1.3), ref[0])
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits.clone()))
    allowed = set(torch.isfinite(warped[0]).nonzero().flatten().tolist())
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.8)
    drawn = {
        choose_token(logits[0], params, seen[:0], torch.Generator().manual_seed(i))
        for i in range(300)
    }
    assert drawn <= allowed and len(drawn) > 1
    assert choose_token(logits[0], SamplingParams(), seen[:0], None) == int(logits.argmax())


def test_draw_follows_the_probabilities_and_its_seed():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(
        torch.tensor([draw(probs, generator) for _ in range(20000)]), minlength=5
    )
    assert counts[1] == counts[4] == 0  # never a token without mass, the last one included
    # 5 standard deviations of a binomial at n=20000 is under 0.018
    assert (counts / 20000 - probs).abs().max() < 0.018
    same = [draw(probs, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(same)) == 1
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.tensor([float("nan"), 0.5]), generator)


def test_rows_drawn_together_are_each_rows_own_draw():
    """Temperature-only rows are drawn in one pass per temperature: each gets the token its
    own choose_token gives with the same seed; other rows keep their own path, and a row
    without finite mass reports an error and falls back to its argmax."""
    from types import SimpleNamespace

    from xtuner_lite.inference.sampling import choose_tokens

    torch.manual_seed(0)
    settings = [dict(temperature=0.7), dict(temperature=1.3), dict(temperature=0.7),
                dict(), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3)]  # fmt: skip
    logits = torch.randn(len(settings), 300) * 3
    logits[3, [10, 200]] = 100.0  # the greedy row's tie: the first largest, as argmax's
    logits[5] = float("nan")

    def rows(seed):
        return [
            SimpleNamespace(
                params=SamplingParams(**kw),
                greedy=not kw.get("temperature"),
                generator=torch.Generator().manual_seed(seed + i),
                prompt_ids=[],
                output_ids=[],
            )  # fmt: skip
            for i, kw in enumerate(settings)
        ]

    for seed in range(20):
        tokens, errors = choose_tokens(logits, rows(seed))
        alone = rows(seed)
        for i, r in enumerate(alone[:5]):
            want = int(logits[i].argmax()) if r.greedy else choose_token(
                logits[i], r.params, torch.empty(0, dtype=torch.long), r.generator
            )  # fmt: skip
            assert tokens[i] == want
        assert list(errors) == [5] and "not finite" in errors[5]


def test_a_prompt_given_several_times_is_prefilled_once(smol):
    """A GRPO group: the same prompt G times is one prefill row, copied; greedy tokens are
    transformers.generate's for every copy."""
    model, tok, prompts, stops = smol
    fed = []
    repeated = [prompts[0], prompts[1], prompts[0], prompts[0], prompts[1]]
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    got = [
        r.output_ids for r in InferenceEngine(_Counting(model, fed), tok).generate(repeated, params)
    ]
    assert fed[0].shape[0] == 2  # two distinct prompts prefilled
    expected = _hf_greedy(model, prompts[:2], stops, batched=False)
    assert got == [expected[i] for i in (0, 1, 0, 0, 1)]


def test_a_repeated_prompt_is_held_once_and_read_by_all_its_rows(smol):
    """A GRPO group held once (``share_kv``): its rows' own caches hold only what they
    generate, rows of other prompts and held ones run in one batch, join mid-decode and retire
    at different steps, and every greedy answer is transformers.generate's."""
    model, tok, prompts, stops = smol
    repeated = [prompts[0], prompts[1], prompts[0], prompts[1], prompts[2], prompts[0]]
    expected = _hf_greedy(model, prompts[:3], stops, batched=False)
    engine = InferenceEngine(model, tok, max_batch_size=4, share_kv=1)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    requests = [engine.add_request(p, params) for p in repeated]
    engine.step()
    held = engine.runner.shared
    assert held is not None and held.mask.shape[0] == 2  # prompts 0 and 1, once each
    assert held.owner.tolist() == [0, 1, 0, 1]
    assert engine.runner.cache.length == 0  # the rows' own caches: nothing generated yet
    while engine.has_work:  # prompts 2 and 0 join alone, in their own rows
        engine.step()
    assert [r.output_ids for r in requests] == [expected[i] for i in (0, 1, 0, 1, 2, 0)]
    assert engine.runner.shared is None and engine.runner.cache is None
    copied = InferenceEngine(model, tok, max_batch_size=4, share_kv=0)
    copied.add_request(prompts[0], params)
    copied.add_request(prompts[0], params)
    copied.step()
    assert copied.runner.shared is None  # share_kv=0: copied into each row, as before


def test_a_held_prompts_answer_is_cached_for_the_next_turn(smol):
    """A finished row that continued a held prompt leaves its prompt and answer cached: the
    next turn prefills only what is new and answers as generate does."""
    model, tok, prompts, stops = smol
    engine = InferenceEngine(model, tok, share_kv=1)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    first = engine.generate([prompts[1], prompts[1]], params)[0]
    follow = prompts[1] + first.output_ids + prompts[2]
    request = engine.generate([follow], params)[0]
    assert request.cached_tokens > len(prompts[1])
    assert request.output_ids == _hf_greedy(model, [follow], stops, batched=False)[0]


def test_chat_drops_oldest_turns_to_fit_the_context():
    from xtuner_lite.commands.chat import ChatSession, GenerationOptions

    session = ChatSession("smollm2-135m-instruct", options=GenerationOptions(max_new_tokens=8))
    session.ask("Name a colour.")
    session.ask("Name a fruit.")
    animal = [{"role": "user", "content": "Name an animal."}]
    full = session._prompt(animal)[0]
    tok = session.tokenizer
    session.context_length = len(full) + 8 - 1  # one token short: the oldest turn goes
    trimmed = tok.decode(session._prompt(animal)[0])
    assert "colour" not in trimmed and "fruit" in trimmed and "animal" in trimmed
    assert "colour" in tok.decode(full)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_engine_equals_transformers_generate(smol, bits):
    """Request by request: bitsandbytes' own kernels make a row depend on its batch (4-bit picks
    another CPU kernel for one row than for several; LLM.int8 picks outlier columns over the
    whole batch), for transformers.generate as much as for us."""
    from xtuner_lite.commands.chat import _quantization
    from xtuner_lite.hub import load_model

    _, tok, prompts, stops = smol
    model = load_model("smollm2-135m-instruct", **_quantization(bits)).eval()
    assert model.is_loaded_in_4bit if bits == 4 else model.is_loaded_in_8bit
    expected = _hf_greedy(model, prompts[:3], stops, batched=False)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    got = [InferenceEngine(model, tok).generate([p], params)[0].output_ids for p in prompts[:3]]
    assert got == expected and any(len(g) > 4 for g in got)


SHOTS = "".join(
    f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n"
    for a, b in [(2, 3), (10, 7), (41, 1), (6, 6), (13, 29)]
)


def _few_shot(tok, questions):
    return [
        tok(SHOTS + f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
        for q in questions
    ]


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_shared_prefix_is_prefilled_once_with_the_same_greedy_tokens(smol):
    """Few-shot prompts admitted together share a long prefix: it is run once (fewer
    prefilled tokens) and every answer is still token-identical to transformers.generate on
    the whole prompt; a later request finds the prefix in the cache."""
    model, tok, _, stops = smol
    prompts = _few_shot(tok, QUESTIONS[:4])
    shared = _common(prompts[0], prompts[1]) // BLOCK_SIZE * BLOCK_SIZE
    assert shared >= 64
    fed = []
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    engine = InferenceEngine(_Counting(model, fed), tok)
    got = [r.output_ids for r in engine.generate(prompts, params)]
    assert got == _hf_greedy(model, prompts, stops, batched=False)
    assert fed[0].shape == (1, shared + 1)  # the shared blocks once, as one row
    assert fed[1].shape[1] <= max(map(len, prompts)) - shared  # then each prompt's own tokens
    fed.clear()
    late = _few_shot(tok, ["How many legs has a cat?"])[0]
    request = engine.generate([late], params)[0]
    assert request.cached_tokens >= shared
    assert fed[0].numel() == len(late) - request.cached_tokens
    assert request.output_ids == _hf_greedy(model, [late], stops, batched=False)[0]
    fed.clear()
    plain = InferenceEngine(_Counting(model, fed), tok, prefix_cache=0)
    assert [r.output_ids for r in plain.generate(prompts, params)] == got
    assert fed[0].numel() == len(prompts) * max(map(len, prompts))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_prefix_cache_hot_or_cold_gives_transformers_tokens(smol, order):
    """Requests one after another with a shared few-shot prefix, in either order: the first
    prefills all, each later one only what follows its cached blocks (the prefix, rounded
    down to whole blocks: a partial block is run again); every answer is generate's."""
    model, tok, _, stops = smol
    prompts = _few_shot(tok, QUESTIONS[:3])
    expected = _hf_greedy(model, prompts, stops, batched=False)
    fed = []
    engine = InferenceEngine(_Counting(model, fed), tok, cache_outputs=False)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    for n, i in enumerate(order):
        fed.clear()
        request = engine.generate([prompts[i]], params)[0]
        assert request.output_ids == expected[i]
        seen = [prompts[j] for j in order[:n]]
        common = max((_common(prompts[i], p) for p in seen), default=0)
        assert n == 0 or common % BLOCK_SIZE  # the shared prefix ends inside a block
        assert request.cached_tokens == common // BLOCK_SIZE * BLOCK_SIZE
        assert fed[0].numel() == len(prompts[i]) - request.cached_tokens


def test_a_conversation_turn_starts_from_the_last_turns_blocks(smol):
    """A finished request's prompt and answer stay cached: the next turn, which re-sends
    them, prefills only what is new, and answers as generate does on the whole prompt."""
    model, tok, prompts, stops = smol
    template = get_template("smollm2")
    engine = InferenceEngine(model, tok)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    messages = [{"role": "user", "content": QUESTIONS[1]}]  # a haiku: a long answer
    first = engine.generate([prompts[1]], params)[0]
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And of Italy?"}]  # fmt: skip
    second = tok(template.render_prompt(messages, tok), add_special_tokens=False)["input_ids"]
    fed = len(prompts[1]) + len(first.output_ids)  # the tokens the engine ran for turn one
    assert _common(second, prompts[1] + first.output_ids) >= fed - 1
    request = engine.generate([second], params)[0]
    assert request.cached_tokens > len(prompts[1])  # the answer's blocks too
    assert request.cached_tokens >= (fed - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert request.output_ids == _hf_greedy(model, [second], stops, batched=False)[0]


def test_prefix_cache_evicts_least_recently_used_blocks_within_its_budget(smol):
    """A budget of four blocks: a long prompt keeps its first four (a chain is evicted from
    its end, so what is left is still a prefix), another prompt's blocks then push them out;
    answers stay generate's throughout."""
    model, tok, prompts, stops = smol
    few = _few_shot(tok, QUESTIONS[:2])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    block = config.num_hidden_layers * 2 * config.num_key_value_heads * BLOCK_SIZE * head_dim * 4
    engine = InferenceEngine(model, tok, prefix_cache=4 * block, cache_outputs=False)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=stops)
    expected = _hf_greedy(model, [few[0], prompts[1]], stops, batched=False)
    assert engine.generate([few[0]], params)[0].output_ids == expected[0][:8]
    assert len(engine.runner.blocks.blocks) == 4 and engine.runner.blocks.nbytes == 4 * block
    again = engine.generate([few[0]], params)[0]
    assert again.cached_tokens == 4 * BLOCK_SIZE and again.output_ids == expected[0][:8]
    other = engine.generate([prompts[1] * 3], params)[0]  # 3 × a short prompt: > 4 blocks
    assert other.cached_tokens == 0
    assert engine.generate([few[0]], params)[0].cached_tokens == 0  # pushed out
    assert engine.runner.blocks.nbytes <= 4 * block


def test_requests_running_together_share_cached_blocks(smol):
    """Requests admitted while others with the same prefix decode find its blocks (cached at
    the first one's prefill) and join the running batch with the same greedy tokens."""
    model, tok, _, stops = smol
    prompts = _few_shot(tok, QUESTIONS[:4])
    expected = _hf_greedy(model, prompts, stops, batched=False)
    engine = InferenceEngine(model, tok, max_batch_size=4)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    requests = [engine.add_request(prompts[0], params)]
    engine.step()
    engine.step()
    requests += [engine.add_request(p, params) for p in prompts[1:]]
    while engine.has_work:
        engine.step()
    assert [r.output_ids for r in requests] == expected
    shared = _common(prompts[0], prompts[1]) // BLOCK_SIZE * BLOCK_SIZE
    assert requests[0].cached_tokens == 0
    assert all(r.cached_tokens >= shared for r in requests[1:])


def test_block_hashes_chain_and_a_collision_is_never_a_match():
    blocks = BlockManager(max_bytes=2**20)
    tokens = list(range(40))
    kv = torch.randn(2, 2, 1, 32, 4)
    blocks.store(tokens, 0, kv)
    assert len(blocks.blocks) == 2 and blocks.first_missing(tokens) == 2
    assert len(blocks.match(tokens, 2)) == 2
    assert torch.equal(gather(blocks.match(tokens, 2)), kv)
    assert blocks.match([99] + tokens[1:], 2) == []  # the chain: block 2 after another block 1
    forged = next(b for b in blocks.blocks.values() if b.tokens[0] == 0)
    forged.tokens = (7,) * BLOCK_SIZE  # as if another block had hashed the same
    assert blocks.match(tokens, 2) == [] and blocks.first_missing(tokens) == 0


@pytest.mark.parametrize("products", ["ours", "ours-avx2", "onednn", "plain"])
def test_fast_decoder_packed_and_plain_equal_transformers_generate(smol, products, monkeypatch):
    """SmolLM2 decodes through FastDecoder (not the model's forward) with packed weights, read
    by our kernel (this CPU's build, and the AVX2 one where it runs) or oneDNN's, and with plain
    ones: same tokens."""
    model, tok, prompts, stops = smol
    monkeypatch.setenv(skinny.SWITCH, {"ours-avx2": "avx2", "onednn": "0"}.get(products, ""))
    if products.startswith("ours") and not skinny.supports(model.lm_head.weight):
        pytest.skip("this CPU runs no such build of our kernel (test_skinny.py checks builds)")
    products = products.split("-")[0]
    expected = _hf_greedy(model, prompts, stops, batched=True)
    engine = InferenceEngine(model, tok, pack_weights=products != "plain")
    assert engine.fallback_reason is None
    kernels = {"ours": {"ours"}, "onednn": {"oneDNN"}, "plain": set()}[products]
    assert set(engine.runner.decoder.packed_by) == kernels
    assert engine.runner.decoder.layers_in_one_call == (products == "ours")
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stops)
    assert [r.output_ids for r in engine.generate(prompts, params)] == expected


def _tiny(kind: str):
    if kind == "llama":
        return tiny_model("llama", vocab_size=97, intermediate_size=96)
    model = tiny_model("qwen2", vocab_size=97, intermediate_size=96, tie_word_embeddings=True)
    for layer in model.model.layers:  # q/k/v carry biases: make them matter
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_layers_in_one_call_are_the_step_call_by_call_in_bf16(kind, monkeypatch):
    """Where our bf16 products run (AMX), a step's layers in one call of our extension give
    the very tokens of the same calls made one by one from Python (same ops, same order)."""
    if not skinny.amx_available():
        pytest.skip("our bf16 products need AMX's bf16 tiles (test_skinny.py checks them)")
    model = _tiny(kind).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_new_tokens=60)
    engine = InferenceEngine(model)
    assert engine.runner.decoder.layers_in_one_call
    in_one_call = [r.output_ids for r in engine.generate(prompts, params)]
    monkeypatch.setattr(FastDecoder, "_layer_plan", lambda self: None)
    engine = InferenceEngine(model)
    assert not engine.runner.decoder.layers_in_one_call
    assert [r.output_ids for r in engine.generate(prompts, params)] == in_one_call


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fast_decoder_on_tiny_models_past_the_cache_growth(kind):
    """One prompt alone for 300 new tokens (the in-place KV cache grows twice), then ragged
    prompts with rows retiring at different steps and one joining late: the same greedy
    tokens as generate."""
    model = _tiny(kind)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    limits = [300, 120, 200]
    expected = []
    for p, n in zip(prompts, limits):
        out = model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p)),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        expected.append(out[0, len(p) :].tolist())
    for pack in (True, False):
        engine = InferenceEngine(model, pack_weights=pack)
        assert engine.fallback_reason is None
        alone = engine.generate(prompts[:1], SamplingParams(max_new_tokens=limits[0]))[0]
        assert alone.output_ids == expected[0], f"pack={pack}"
        requests = [
            engine.add_request(p, SamplingParams(max_new_tokens=n))
            for p, n in zip(prompts[:2], limits[:2])
        ]
        for _ in range(30):
            engine.step()
        requests.append(engine.add_request(prompts[2], SamplingParams(max_new_tokens=200)))
        while engine.has_work:
            engine.step()
        assert [r.output_ids for r in requests] == expected, f"pack={pack}"
        assert engine.runner.cache is None  # every row retired


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_held_prompts_on_tiny_models_past_the_cache_growth(kind):
    """Groups of a repeated prompt held once (one group joining while another decodes), rows
    retiring at different steps, past the own cache's growth: generate's greedy tokens."""
    model = _tiny(kind)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (21, 6)]

    def generate(p: list[int], n: int) -> list[int]:
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
        return out[0, len(p) :].tolist()

    engine = InferenceEngine(model, share_kv=1)
    limits = [(0, 150), (0, 40), (0, 150), (1, 90), (1, 160)]
    group = [
        engine.add_request(prompts[p], SamplingParams(max_new_tokens=n)) for p, n in limits[:3]
    ]
    for _ in range(10):
        engine.step()
    group += [
        engine.add_request(prompts[p], SamplingParams(max_new_tokens=n)) for p, n in limits[3:]
    ]
    engine.step()
    assert engine.runner.shared.mask.shape[0] == 2
    while engine.has_work:
        engine.step()
    assert [r.output_ids for r in group] == [generate(prompts[p], n) for p, n in limits]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fast_decoder_runs_live_lora_adapters_as_transformers_does(kind):
    """An unmerged LoRA model (every projection and the head, B non-zero, as after training)
    decodes through FastDecoder with the same greedy tokens as generate on the peft model; with
    the adapter disabled, the base model's tokens. RL rollouts sample this way from the policy
    being trained."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    config.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj", "lm_head"]  # fmt: skip
    model = peft.get_peft_model(_tiny(kind), config).eval()
    gen = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 11, 8)]

    def generate_each(peft_model) -> list[list[int]]:
        return [
            peft_model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                                max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]  # fmt: skip

    engine = InferenceEngine(model)
    assert engine.fallback_reason is None
    params = SamplingParams(max_new_tokens=40)
    adapted = [r.output_ids for r in engine.generate(prompts, params)]
    assert adapted == generate_each(model)
    # as RL rollouts decode: the adapter merged into the packed weights
    merged = InferenceEngine(model, pack_weights=True, merge_adapters=True)
    layers = len(model.get_base_model().model.layers)
    assert merged.runner.decoder.merged_layers == 7 * layers + 1  # the head has an adapter too
    assert [r.output_ids for r in merged.generate(prompts, params)] == adapted
    with model.disable_adapter():
        base = [r.output_ids for r in InferenceEngine(model).generate(prompts, params)]
        assert base == generate_each(model)
        unmerged = InferenceEngine(model, pack_weights=True, merge_adapters=True)
        assert unmerged.runner.decoder.merged_layers == 0
        assert [r.output_ids for r in unmerged.generate(prompts, params)] == base
    assert base != adapted  # the adapter changes the tokens, so the test can tell


def test_models_the_fast_decoder_does_not_cover_are_named_with_the_reason():
    """These decode through their own forward (the engine's other tests cover that path: the
    counting wrapper, 4/8-bit models)."""
    from xtuner_lite.inference.decoder import unsupported_reason

    mistral = tiny_model("mistral", vocab_size=97, num_hidden_layers=1, sliding_window=16)
    assert "model type 'mistral'" in unsupported_reason(mistral)
    assert "laid out as Llama's" in unsupported_reason(_tiny("llama").model)  # a bare decoder
    peft = pytest.importorskip("peft")
    dora = peft.LoraConfig(target_modules=["q_proj"], use_dora=True)
    assert (
        "not plain LoRA"
        in InferenceEngine(peft.get_peft_model(_tiny("llama"), dora)).fallback_reason
    )

    class Quantized(torch.nn.Linear):
        pass

    model = _tiny("llama")
    model.model.layers[1].mlp.up_proj = Quantized(64, 96, bias=False)
    assert "wrapped" in unsupported_reason(model)


def test_precision_auto_is_bf16_only_where_the_machine_multiplies_it_natively(monkeypatch):
    from xtuner_lite.model import precision

    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    for native, expected in [(True, "bfloat16"), (False, "float32")]:
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda native=native: native)
        assert precision.inference_dtype("auto") == expected
    assert precision.inference_dtype("fp32") == "float32"
    assert precision.inference_dtype("bf16") == "bfloat16"
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    for capability, expected in [((8, 0), "bfloat16"), ((7, 5), "float16")]:  # A100, T4
        monkeypatch.setattr(precision, "cuda_capability", lambda index=0, c=capability: c)
        assert precision.inference_dtype("auto") == expected


def test_chat_in_bf16_loads_bf16_weights_and_answers():
    from xtuner_lite.commands.chat import ChatSession, GenerationOptions

    session = ChatSession(
        "smollm2-135m-instruct", options=GenerationOptions(max_new_tokens=6), precision="bf16"
    )
    assert next(session.chat.model.parameters()).dtype == torch.bfloat16
    assert session.engine.fallback_reason is None  # the fast decoder runs bf16 too
    assert session.ask("Name a colour.")
