import json

import pytest
import torch

from xtuner_lite.cli import main
from xtuner_lite.commands.merge import architecture_of, merge_adapter
from xtuner_lite.data.templates import get_template
from xtuner_lite.errors import XtunerError
from xtuner_lite.model import build_model

from conftest import tiny_model

pytestmark = pytest.mark.integration


def _make_adapter(base, folder, method="lora", template="chatml", **lora):
    """A trained-looking adapter: random (non-zero) LoRA B, saved as ``xtuner train`` does."""
    torch.manual_seed(0)
    model = build_model(
        base, method=method, lora=dict(r=4, alpha=8, dropout=0.0, **lora), compute_dtype="fp32"
    )
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(folder)
    (folder / "xtuner_lite.json").write_text(
        json.dumps(
            {
                "base_model": base,
                "template": template,
                "architecture": architecture_of(model.get_base_model().config),
            }
        )
    )
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "method,lora",
    [("lora", {}), ("qlora", {}), ("lora", {"use_dora": True}), ("lora", {"use_rslora": True})],
    ids=["lora", "qlora", "dora", "rslora"],
)
def test_merged_logits_equal_base_plus_adapter(tiny_llama, tmp_path, method, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = _make_adapter(tiny_llama, tmp_path / "adapter", method, **lora)
    out = merge_adapter(None, adapter, tmp_path / "merged", dtype="fp32")
    ids = torch.randint(3, 200, (2, 17))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected = _logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)  # peft wrapped `base` in place
    assert not torch.allclose(_logits(plain, ids), expected, atol=1e-3)  # the adapter matters

    tok = AutoTokenizer.from_pretrained(out)
    conv = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True
    ) == get_template("chatml").render_prompt(conv, tok)
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert sorted(p.suffix for p in out.glob("*.safetensors")) == [".safetensors"]


def test_merge_refuses_a_different_base(tiny_llama, tmp_path):
    adapter = _make_adapter(tiny_llama, tmp_path / "adapter")
    other = tmp_path / "other"
    tiny_model(vocab_size=300, hidden_size=32, intermediate_size=64).save_pretrained(other)
    with pytest.raises(XtunerError, match="different model.*hidden_size: adapter 64 vs base 32"):
        merge_adapter(str(other), adapter, tmp_path / "m1")
    with pytest.raises(XtunerError, match="does not fit base"):  # shapes, when told to skip
        merge_adapter(str(other), adapter, tmp_path / "m2", any_base=True)
    meta = json.loads((adapter / "xtuner_lite.json").read_text())
    del meta["architecture"]
    (adapter / "xtuner_lite.json").write_text(json.dumps(meta))
    with pytest.raises(XtunerError, match="was trained on"):  # the recorded base name
        merge_adapter(str(other), adapter, tmp_path / "m3")
    assert not any(p.name.startswith("m") for p in tmp_path.iterdir())


def test_merge_cli_refuses_existing_output_unless_forced(tiny_llama, tmp_path, capsys):
    adapter = _make_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    assert main(["merge", "-", str(adapter), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["merge", "-", str(adapter), str(out), "--force", "--dtype", "bf16"]) == 0
    assert json.loads((out / "xtuner_lite.json").read_text())["dtype"] == "bf16"
    assert main(["merge", "-", str(tmp_path), str(tmp_path / "x")]) == 1
    assert "not a peft adapter folder" in capsys.readouterr().err
