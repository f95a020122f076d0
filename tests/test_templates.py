import re
from types import SimpleNamespace

import pytest

from xtuner_lite.data import IGNORE_INDEX, TEMPLATES, get_template, tokenize_rendered
from xtuner_lite.errors import XtunerError

CONV = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]

# Written from each model card's chat template (bos/eos as that model's tokenizer has them).
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
    ),
    "internlm2_chat": (
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
    ),
    "llama2_chat": (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] A2 </s>"
    ),
    "llama3_chat": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
    ),
    "mistral": "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>",
    "gemma": (
        "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1"
        "<end_of_turn>\n<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2"
        "<end_of_turn>\n"
    ),
    "phi3": (
        "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n"
        "<|user|>\nU2<|end|>\n<|assistant|>\nA2<|end|>\n"
    ),
    "default": (
        "S\n\n### Instruction:\nU1\n\n### Response:\nA1</s>\n\n### Instruction:\nU2\n\n"
        "### Response:\nA2</s>\n\n"
    ),
}
SPECIALS = {
    "llama3_chat": ("<|begin_of_text|>", "<|end_of_text|>"),
    "gemma": ("<bos>", "<eos>"),
}


def _fake_tokenizer(name):
    bos, eos = SPECIALS.get(name, ("<s>", "</s>"))
    return SimpleNamespace(bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendering_matches_model_card(name):
    tmpl = get_template(name)
    text = "".join(t for t, _ in tmpl.render(CONV, _fake_tokenizer(name)))
    assert text == EXPECTED[name]


def test_default_system_prompts():
    qwen = "".join(t for t, _ in get_template("qwen2_5").render(CONV[1:3]))
    assert qwen.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert "system" not in "".join(t for t, _ in get_template("chatml").render(CONV[1:3]))


def test_generation_prompts():
    tok = _fake_tokenizer("llama3_chat")
    prompt = get_template("llama3_chat").render_prompt(CONV[:2], tok)
    assert prompt.endswith("U1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert get_template("chatml").render_prompt(CONV[1:2]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("name", ["smollm2", "auto"])
def test_smollm2_byte_identical_to_apply_chat_template(name, with_system, smol_tokenizer):
    """Tool messages are left out: SmolLM2's jinja has no tool syntax, ours writes Qwen2.5's
    (tests/test_tools.py checks that against Qwen2.5's own template)."""
    conv = CONV if with_system else CONV[1:]
    conv = conv + [
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": '{"name": "f"}'},
        {"role": "user", "content": '{"result": 4}'},
        {"role": "assistant", "content": "It is 4.\n\nDone."},
    ]
    tmpl = get_template(name, smol_tokenizer)
    ours = "".join(t for t, _ in tmpl.render(conv, smol_tokenizer))
    assert ours == smol_tokenizer.apply_chat_template(conv, tokenize=False)
    prompt = tmpl.render_prompt(conv[:-1], smol_tokenizer)
    assert prompt == smol_tokenizer.apply_chat_template(
        conv[:-1], tokenize=False, add_generation_prompt=True
    )


def _tokenizer_for(name, smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    text = EXPECTED.get(name, "") + "".join(str(v) for v in vars(TEMPLATES[name]).values())
    specials = sorted(
        set(re.findall(r"<\|?[a-z_]+\|?>|\[/?INST\]", text)) - {"<|im_start|>", "<|im_end|>"}
    )
    tok.add_tokens(specials, special_tokens=True)
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_token_by_token(name, smol_tokenizer):
    """Each token: trained iff it belongs to an assistant reply or its end-of-turn token."""
    tok = _tokenizer_for(name, smol_tokenizer)
    tmpl = get_template(name)
    conv = CONV + [
        {"role": "user", "content": "U3"},
        {"role": "assistant", "content": "skip me", "loss": False},
        {"role": "user", "content": "U4"},
        {"role": "assistant", "content": "Final answer: 42."},
    ]
    segments = tmpl.render(conv, tok)
    ids, labels = tokenize_rendered([segments], tok, None).sample(0)
    assert tok.decode(ids) == "".join(t for t, _ in segments)
    eot = tmpl._fill(tmpl.eot, tok)
    expected = [
        m["content"] + eot for m in conv if m["role"] == "assistant" and m.get("loss", True)
    ]
    runs, cur = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == token
            cur.append(token)
    runs += [cur] if cur else []
    got = [tok.decode(r) for r in runs]
    assert [g.strip() for g in got] == [e.strip() for e in expected]
    for g, e in zip(got, expected):
        assert g.endswith(e.strip()) and len(g) - len(e) <= 1  # at most a shared leading space


def test_unknown_template_suggests():
    with pytest.raises(XtunerError, match="did you mean 'chatml'"):
        get_template("chatm")


def test_auto_without_chat_template_is_clear():
    with pytest.raises(XtunerError, match="needs a tokenizer with a chat_template"):
        get_template("auto", SimpleNamespace(chat_template=None))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_to_jinja_renders_like_the_template(name, smol_tokenizer):
    """Merged models carry the training template as a jinja chat_template: same text, always."""
    tok = _tokenizer_for(name, smol_tokenizer) if name in EXPECTED else smol_tokenizer
    tmpl = get_template(name)
    if name == "mistral_v3":  # merged with its published template (test_tools)
        with pytest.raises(XtunerError, match="not written as jinja here"):
            tmpl.to_jinja()
        return
    jinja = tmpl.to_jinja()
    quoted = [{"role": "user", "content": 'say "hi"\\n\nand {{ this }}'}]
    tool = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "tool", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    for conv in (CONV, CONV[1:], CONV[1:2], quoted, tool):
        for gen in (True, False):
            if not gen and conv[-1]["role"] != "assistant":
                continue
            want = (
                tmpl.render_prompt(conv, tok)
                if gen
                else "".join(t for t, _ in tmpl.render(conv, tok))
            )
            got = smol_tokenizer.apply_chat_template(
                conv,
                tokenize=False,
                add_generation_prompt=gen,
                chat_template=jinja,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
            )
            assert got == want, (name, conv)
