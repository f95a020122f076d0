import numpy as np
import pytest
import torch

from xtuner_lite.data import IGNORE_INDEX, build_packed, collate_packed
from xtuner_lite.data.tokenize import TokenizedBatch
from xtuner_lite.errors import XtunerError
from xtuner_lite.model import (
    attention,
    build_model,
    chunked_lm_loss,
    loss_sum,
    skip_adapter_input_casts,
)
from xtuner_lite.model.attention import PACKED_SDPA, segments_of
from xtuner_lite.model.dropout import DropoutLinear

from conftest import nonzero_lora_b, real_step

LENGTHS = [5, 9, 3, 12]


def _samples(vocab=200, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=sum(LENGTHS)).astype(np.int32)
    labels = ids.copy()
    labels[rng.random(len(ids)) < 0.3] = IGNORE_INDEX  # some prompt tokens
    return TokenizedBatch(ids, labels, np.array(LENGTHS), np.zeros(len(LENGTHS), bool))


def _rows(pack: bool):
    data = build_packed(_samples(), max_length=64, pack=pack, shuffle=False)
    return [data.row(i) for i in range(len(data))]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_per_sample(tiny_llama, attn):
    model = build_model(tiny_llama, method="full", attn_implementation=attn)
    packed = _rows(pack=True)
    assert len(packed) == 1 and len(packed[0]["cu_seqlens"]) == 5
    loss_p, n_p = loss_sum(model, collate_packed(packed))
    loss_p.backward()
    grads_p = _grads(model)
    model.zero_grad()
    total, n = 0.0, 0
    for row in _rows(pack=False):
        loss, count = loss_sum(model, collate_packed([row]))
        loss.backward()
        total, n = total + float(loss), n + count
    assert n_p == n
    assert abs(float(loss_p) - total) < 1e-4
    _assert_same(grads_p, _grads(model))


@pytest.mark.parametrize("matmul_max_length", [1024, 0], ids=["matmul", "sdpa-fp32"])
def test_packed_sdpa_equals_the_block_mask_and_is_plain_sdpa_otherwise(
    tiny_llama, monkeypatch, matmul_max_length
):
    """CPU attends sample by sample with two matmuls, and with SDPA in fp32 beyond
    MATMUL_ATTENTION_MAX_LENGTH: both must equal one block-masked SDPA call."""
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_LENGTH", matmul_max_length)
    model = build_model(tiny_llama, method="full")
    assert model.config._attn_implementation == PACKED_SDPA
    batch = collate_packed(_rows(pack=True) + _rows(pack=False)[:1])  # 2nd row: padded tail
    assert segments_of(batch["cu_seqlens"], *batch["input_ids"].shape) == [
        (0, 0, 12),
        (0, 12, 21),
        (0, 21, 26),
        (0, 26, 29),
        (1, 0, 5),
        (1, 5, 29),
    ]
    losses, grads, logits = [], [], []
    ids = batch["input_ids"][:1, :12]
    for impl in (PACKED_SDPA, "sdpa"):  # sample by sample, then one block-masked call
        model.config._attn_implementation = impl
        model.zero_grad()
        loss, _ = loss_sum(model, batch)
        loss.backward()
        losses.append(float(loss))
        grads.append(_grads(model))
        with torch.no_grad():  # no segments (generation, evaluation): SDPA with its mask
            logits.append(model(ids, attention_mask=torch.ones_like(ids)).logits)
    assert abs(losses[0] - losses[1]) < 1e-4
    _assert_same(*grads)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_matmul_attention_pads_lengths_to_few_shapes(monkeypatch):
    """Every sample length its own matmul shape made oneDNN cache a kernel per length (resident
    memory grew step after step); padded lengths give a few shapes and the same result."""
    shapes = set()
    apply = attention._MatmulAttention.apply
    monkeypatch.setattr(
        attention._MatmulAttention,
        "apply",
        lambda q, k, v, s, bias: shapes.add(tuple(k.shape)) or apply(q, k, v, s, bias),
    )
    torch.manual_seed(0)
    step = attention.ATTENTION_LENGTH_STEP
    for length in range(1, 3 * step + 1):
        q, k, v = (
            torch.randn(heads, length, 8, dtype=torch.float64, requires_grad=True)
            for heads in (4, 2, 2)
        )
        out = attention.matmul_attention(q, k, v, None)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        torch.testing.assert_close(out, ref)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert {s[1] for s in shapes} == {step, 2 * step, 3 * step}


@pytest.mark.parametrize("root", [0, 5])
def test_branched_attention_equals_the_dense_branch_mask(root):
    """Branches each run against [root keys, own keys] give the outputs and gradients of SDPA
    under the dense branch mask (fp64, grouped-query heads), with and without a root; the
    layout read back from branch/root ids is the one the mask was built from."""
    torch.manual_seed(0)
    lengths = [7, 1, 40, 3]
    branch = torch.cat([torch.zeros(root, dtype=torch.long)] +
                       [torch.full((n,), i + 1) for i, n in enumerate(lengths)])  # fmt: skip
    layout = attention.branches_of(branch, torch.zeros_like(branch))
    ends = torch.tensor(lengths).cumsum(0) + root
    assert layout.root == root and [e for _, e in layout.spans] == ends.tolist()
    assert torch.equal(layout.mask(branch.device), attention.branch_mask(branch, 0 * branch))
    q, k, v = (
        torch.randn(heads, len(branch), 8, dtype=torch.float64, requires_grad=True)
        for heads in (4, 2, 2)
    )
    out = attention.branched_attention(q, k, v, None, layout)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.mask(q.device), enable_gqa=True
    )
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref)
    got, want = (torch.autograd.grad(o, (q, k, v), grad) for o in (out, ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_accumulation_equals_one_big_batch(tiny_llama):
    """4 micro-batches of 1 sample == 1 batch of 4 samples (different lengths), fp32, through
    the real optimizer step."""
    model = build_model(tiny_llama, method="full")
    rows = _rows(pack=False)
    mean_big, big = real_step(model, [collate_packed(rows)])
    mean_acc, acc = real_step(model, [collate_packed([r]) for r in rows])
    assert abs(mean_big - mean_acc) < 1e-5
    assert len(big) == len(list(model.parameters()))
    _assert_same(big, acc)


def test_chunked_loss_matches_transformers(tiny_llama):
    model = build_model(tiny_llama, method="full")
    row = _rows(pack=False)[0]
    batch = collate_packed([row])
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    loss, count = chunked_lm_loss(hidden, model.lm_head, batch["labels"], chunk_size=2)
    (loss / count).backward()
    torch.testing.assert_close(loss / count, ref, atol=1e-5, rtol=1e-5)
    _assert_same(ref_grads, _grads(model))


def test_chunked_loss_pads_rows_to_few_head_shapes(monkeypatch):
    """The trained-token count varies every step; the head's products see a multiple of
    LOSS_ROW_STEP rows (a few shapes for oneDNN to cache) and the padding changes nothing."""
    from xtuner_lite.model import loss as loss_module

    rows = set()
    linear = torch.nn.functional.linear
    monkeypatch.setattr(
        loss_module.F, "linear", lambda x, w, b=None: rows.add(x.shape[0]) or linear(x, w, b)
    )
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    step = loss_module.LOSS_ROW_STEP
    for length in (1, step - 1, step, step + 5, 3 * step + 2):
        hidden = torch.randn(1, length + 1, 16, requires_grad=True)
        labels = torch.randint(0, 50, (1, length + 1))
        labels[0, 0] = IGNORE_INDEX  # never a target (the shifted labels start at position 1)
        total, count = chunked_lm_loss(hidden, head, labels, chunk_size=2 * step)
        total.backward()
        got = (total.detach(), hidden.grad, head.weight.grad, head.bias.grad)
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
        logits = linear(hidden[0, :-1], head.weight, head.bias)
        ref = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum")
        ref.backward()
        assert count == length
        torch.testing.assert_close(got[0], ref.detach())
        torch.testing.assert_close(got[1], hidden.grad)
        torch.testing.assert_close(got[2], head.weight.grad)
        torch.testing.assert_close(got[3], head.bias.grad)
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    assert rows <= {step, 2 * step}


def test_lora_targets_every_linear_but_the_head(tiny_llama):
    model = build_model(tiny_llama, method="lora", lora=dict(r=4, alpha=8, dropout=0.0))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(wrapped) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert not any("lm_head" in n for n in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_trains_after_an_eval_no_grad_forward(tiny_llama):
    """Guards the bitsandbytes CPU repack bug: eval forward must not freeze LoRA gradients."""
    import bitsandbytes as bnb

    model = build_model(
        tiny_llama, method="qlora", lora=dict(r=4, alpha=8, dropout=0.0), compute_dtype="fp32"
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = collate_packed(_rows(pack=True))
    model.eval()
    with torch.no_grad():
        loss_sum(model, batch)
    model.train()
    before = {n: p.detach().clone() for n, p in _lora_params(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at zero, so A first gets a gradient on the second step
        _, grads = real_step(model, [batch], optimizer=optimizer)
        assert grads.keys() == _lora_params(model).keys()
    for name, p in _lora_params(model).items():
        assert grads[name].abs().sum() > 0, f"{name} got a zero gradient"
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"


def test_qlora_keeps_embeddings_in_their_dtype(tiny_llama):
    model = build_model(tiny_llama, method="qlora", dtype="bf16", lora=dict(r=4))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "method,every", [("lora", True), ("lora", 2), ("lora", 0.5), ("full", True)]
)
def test_gradient_checkpointing_gives_same_gradients(tiny_llama, method, every):
    """Recomputed layers replay the same LoRA dropout masks (dropout is on here)."""
    batch = collate_packed(_rows(pack=True))
    grads = []
    for checkpointing in (False, every):
        torch.manual_seed(0)
        model = build_model(
            tiny_llama,
            method=method,
            lora=dict(r=4, dropout=0.1),
            gradient_checkpointing=checkpointing,
        )
        model.train()
        if method == "lora":
            nonzero_lora_b(model, std=0.1)
        grads.append(real_step(model, [batch])[1])
    layers = [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", None) is not None
        and type(m).__name__.endswith("DecoderLayer")
    ]
    assert [m.gradient_checkpointing for m in layers] == {
        True: [True, True],
        2: [True, False],
        0.5: [False, True],
    }[every]
    _assert_same(*grads)


def test_checkpointing_interval_is_validated(tiny_llama):
    with pytest.raises(XtunerError, match="gradient_checkpointing"):
        build_model(tiny_llama, method="lora", gradient_checkpointing=-2)


def _dropout_linear(weight: torch.Tensor, p: float = 0.1) -> DropoutLinear:
    module = DropoutLinear(weight.shape[1], weight.shape[0], p)
    module.weight = torch.nn.Parameter(weight.clone())
    return module.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_linear_rate_scale_and_gradients(dtype):
    """Through an identity weight the output is the dropped input (rate, 1/(1-p) scale); through
    a random weight, output and both gradients equal autograd through that same mask."""
    x = torch.full((1000, 1000), 2.0, dtype=dtype, requires_grad=True)
    identity = _dropout_linear(torch.eye(1000, dtype=dtype))
    torch.manual_seed(0)
    y = identity(x)
    keep = y.detach() != 0
    assert y.dtype == dtype and set(y.unique().tolist()) == {0.0, float(x[0, 0] * identity.scale)}
    assert abs(1 - float(keep.float().mean()) - 0.1) < 0.002  # 1e6 draws: 5 sd ≈ 0.0015
    assert abs(float(y.float().mean()) - 2.0) < 0.02
    torch.manual_seed(0)  # the mask comes from torch's generator state: same seed, same mask
    assert torch.equal(identity(x), y)
    assert not torch.equal(identity(x), y)

    torch.manual_seed(1)
    weight = torch.randn(8, 1000, dtype=dtype)
    inputs = torch.randn(1000, 1000, dtype=dtype).requires_grad_()
    module = _dropout_linear(weight)
    torch.manual_seed(0)
    out = module(inputs)
    reference_w = weight.clone().requires_grad_()
    reference = torch.nn.functional.linear(inputs * keep, reference_w) * identity.scale
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_grad = inputs.grad.clone()
    inputs.grad = None
    reference.backward(grad)
    torch.testing.assert_close(x_grad, inputs.grad)
    torch.testing.assert_close(module.weight.grad, reference_w.grad)
    module.eval()
    torch.testing.assert_close(module(inputs), torch.nn.functional.linear(inputs, weight))


def test_dropout_linear_saves_the_shared_input_not_masks():
    """q/k/v read one input: their products save that tensor, their weights and their masks
    as bits (an eighth of a byte per element), nothing else."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    modules = [_dropout_linear(torch.randn(4, 32)) for _ in range(3)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = [m(x.requires_grad_()) for m in modules]
    weights = {m.weight.untyped_storage().data_ptr() for m in modules}
    rest = [t for t in saved if t.untyped_storage().data_ptr() not in weights]
    assert {t.untyped_storage().data_ptr() for t in rest if t.dtype != torch.uint8} == {
        x.untyped_storage().data_ptr()
    }
    bits = [t for t in rest if t.dtype == torch.uint8]
    assert len(bits) == 3 and all(t.numel() == x.numel() // 8 for t in bits)
    sum(o.float().sum() for o in outputs).backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32 for m in modules)


def test_lora_fuses_its_dropout_into_lora_a(tiny_llama):
    model = build_model(tiny_llama, method="lora", lora=dict(r=4, dropout=0.05))
    fused = [m for m in model.modules() if isinstance(m, DropoutLinear)]
    assert len(fused) == 2 * 7 and all(m.p == 0.05 for m in fused)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert any(".lora_A.default.weight" in k for k in model.state_dict())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_gradients_match_autograd(bias):
    """Gradients computed inside the loss forward equal autograd through full logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(2, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, :4] = IGNORE_INDEX
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    ref = torch.nn.functional.cross_entropy(
        logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    ref.backward()
    ref_grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    loss, count = chunked_lm_loss(hidden, head, labels, chunk_size=3)
    (loss * 0.5).backward()  # the upstream gradient scales every computed gradient
    torch.testing.assert_close(loss, ref)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    got = [hidden.grad] + [p.grad for p in head.parameters()]
    for a, b in zip(got, ref_grads):
        torch.testing.assert_close(a, b * 0.5, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, head, labels)[0], ref)


def test_autocast_skips_adapter_input_casts(tiny_llama):
    """Under autocast the fp32 cast of LoRA inputs is redundant: same loss without it."""
    model = build_model(tiny_llama, method="lora", dtype="bf16", lora=dict(r=4, dropout=0.0))
    batch = collate_packed(_rows(pack=True))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = loss_sum(model, batch)[0]
        assert skip_adapter_input_casts(model) == 2 * 7
        after = loss_sum(model, batch)[0]
    torch.testing.assert_close(before, after, rtol=1e-2, atol=1e-2)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


def test_bf16_lora_weights_train_and_are_planned(tiny_llama):
    """model.lora_dtype='bf16' (the QLoRA paper's adapters): bf16 weights and gradients, the
    loss falls under autocast, and the planner counts 2 bytes per adapter weight and gradient."""
    from xtuner_lite.commands.plan import PlanSettings, Shape, plan_memory

    model = build_model(
        tiny_llama, method="qlora", lora=dict(r=4, alpha=8, dropout=0.0), lora_dtype="bf16"
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    batch = collate_packed(_rows(pack=True))
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    losses = []
    for _ in range(6):
        loss, grads = real_step(model, [batch], dtype="bf16", optimizer=optimizer)
        losses.append(loss)
        assert len(grads) == len(trained)
        assert all(g.dtype == torch.bfloat16 for g in grads.values())
    assert losses[-1] < losses[0]
    shape = Shape.from_config(model.config)
    fp32, bf16 = (
        plan_memory(shape, PlanSettings(lora_r=4, lora_dtype=d)) for d in ("fp32", "bf16")
    )
    stored = sum(p.numel() * p.element_size() for p in trained)
    assert bf16.get("adapter") == stored == fp32.get("adapter") / 2
    assert bf16.get("gradients") == fp32.get("gradients") / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_and_mlp_equal_transformers_and_save_less(dtype):
    """Same outputs and gradients as LlamaRMSNorm / LlamaMLP (fp32: to rounding; bf16: within
    bf16 rounding), with less kept for backward: no fp32 copy of the norm's input, no SiLU
    output."""
    import copy

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    from xtuner_lite.model.lean_layers import use_lean_layers

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160)
    originals = [LlamaRMSNorm(64, eps=1e-5), LlamaMLP(config)]
    torch.nn.init.normal_(originals[0].weight, 1.0, 0.3)
    for original in originals:
        original.to(dtype)
        lean = copy.deepcopy(original)
        assert use_lean_layers(lean) == 1
        x = torch.randn(3, 17, 64, dtype=dtype)
        grad = torch.randn(3, 17, 64, dtype=dtype)
        results, kept = [], []
        for module in (original, lean):
            inputs = x.clone().requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t) or t, lambda t: t
            ):
                out = module(inputs)
            out.backward(grad)
            params = {p.untyped_storage().data_ptr() for p in module.parameters()}
            kept.append(
                sum(
                    t.untyped_storage().nbytes()
                    for t in {t.untyped_storage().data_ptr(): t for t in saved}.values()
                    if t.untyped_storage().data_ptr() not in params
                )
            )
            results.append([out, inputs.grad, *(p.grad for p in module.parameters())])
        tolerance = (
            dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        )
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **tolerance)
        assert kept[1] < kept[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_lora_equals_peft_and_keeps_peft_for_the_rest(dtype, bias, dropout):
    """The fused LoRA product gives peft's outputs and input/adapter gradients (fp32: to
    rounding; bf16 weights under autocast, as LoRA trains: within bf16 rounding), with LoRA
    dropout fused into lora_A the same mask as that layer's own forward draws; a disabled
    adapter (the reference forward) is the base layer alone."""
    import copy

    from peft import LoraConfig, get_peft_model

    from xtuner_lite.model.dropout import fuse_lora_dropout
    from xtuner_lite.model.lean_lora import use_lean_lora

    torch.manual_seed(0)
    weights = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=bias)).to(weights)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_rslora=bias, lora_dropout=dropout
    )
    peft_model = get_peft_model(base, config)
    assert fuse_lora_dropout(peft_model) == (dropout > 0)
    nonzero_lora_b(peft_model, std=0.5)
    lean = copy.deepcopy(peft_model)
    assert use_lean_lora(lean) == 1
    x = torch.randn(3, 9, 48, dtype=weights)
    grad = torch.randn(3, 9, 40, dtype=weights)
    results = []
    for model in (peft_model, lean):
        inputs = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout mask on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(inputs)
        out.backward(grad)
        trained = [p.grad for p in model.parameters() if p.requires_grad]
        results.append([out, inputs.grad, *trained])
    assert len(results[1]) == 4 and results[1][0].dtype == results[0][0].dtype
    for a, b in zip(*results):
        if dtype == "fp32":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # bf16 rounding, relative to the tensor's scale (sums of products with cancels)
            assert float((a - b).abs().max()) <= 2e-2 * float(b.abs().max())
    frozen = lean.get_base_model()[0].base_layer
    with torch.no_grad(), lean.disable_adapter():
        torch.testing.assert_close(lean(x), frozen(x), rtol=0, atol=0)
    if dropout:  # the mask was applied: evaluation (no dropout) gives other outputs
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            assert not torch.allclose(lean.eval()(x), results[1][0], rtol=1e-2, atol=1e-2)
