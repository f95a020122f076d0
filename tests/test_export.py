"""GGUF export: the file reads back with the gguf package and loads in transformers unchanged."""

import pytest
import torch
from test_merge import _make_adapter

from xtuner_lite.cli import main
from xtuner_lite.commands.export import export_gguf
from xtuner_lite.commands.merge import merge_adapter
from xtuner_lite.errors import XtunerError

from conftest import tiny_model

pytestmark = pytest.mark.integration


def _load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_round_trip_gives_the_same_greedy_output(tmp_path):
    from gguf import GGUFReader

    from xtuner_lite.hub import load_model, load_tokenizer, resolve_model_path

    folder = resolve_model_path("smollm2-135m-instruct")
    out = tmp_path / "smollm2.gguf"
    assert main(["export", "gguf", folder, str(out), "--dtype", "f32"]) == 0
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.tensors) == 272  # tied head: no output.weight, as in the original file

    reference, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    model, gguf_tokenizer = _load_gguf(out)
    conv = [{"role": "user", "content": "What is 12 times 7? Explain."}]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert gguf_tokenizer(text, add_special_tokens=False).input_ids == ids[0].tolist()
    expected = reference.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)


def test_merged_adapter_exports_with_its_template(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _make_adapter(tiny_llama, tmp_path / "adapter", template="chatml")
    merged = merge_adapter(None, adapter, tmp_path / "merged", dtype="fp32")
    out = export_gguf(merged, tmp_path / "m.gguf", dtype="f16")
    model, tokenizer = _load_gguf(out)
    reference = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-2, rtol=0)
    # q/k rows permuted both ways: the rotary layout is right, not merely the values
    for proj in ("q_proj", "k_proj"):
        got = getattr(model.model.layers[0].self_attn, proj).weight.detach()
        want = getattr(reference.model.layers[0].self_attn, proj).weight.detach()
        assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(merged).chat_template


def test_q8_0_weights_dequantize_close(tiny_llama, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    out = export_gguf(tiny_llama, tmp_path / "m.gguf", dtype="q8_0")
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert tensors["output_norm.weight"].tensor_type.name == "F32"  # 1-D stays f32
    up = tensors["blk.1.ffn_up.weight"]
    assert up.tensor_type.name == "Q8_0"
    got = torch.from_numpy(dequantize(up.data, up.tensor_type).reshape(128, 64).copy())
    want = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[1].mlp.up_proj.weight
    assert (got - want.detach()).abs().max() <= want.abs().max() / 127  # one 8-bit step


def test_qwen2_exports(tmp_path, smol_tokenizer):
    folder = tmp_path / "qwen"
    reference = tiny_model("qwen2", vocab_size=len(smol_tokenizer), tie_word_embeddings=False)
    reference.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    model, _ = _load_gguf(export_gguf(folder, tmp_path / "q.gguf", dtype="f32"))
    ids = torch.randint(3, 500, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_export_refusals(tiny_llama, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(XtunerError, match="not a model folder"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    assert main(["export", "gguf", tiny_llama, str(tmp_path / "exists.gguf")]) == 1
    assert "pass --force" in capsys.readouterr().err
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "g")
    with pytest.raises(XtunerError, match="model_type 'gpt2' cannot be exported"):
        export_gguf(tmp_path / "g", tmp_path / "g.gguf")
