"""``xtuner export gguf``: a merged Hugging Face folder → one GGUF file (llama.cpp, Ollama, ...).

Tensor names come from the ``gguf`` package's own HF → GGUF table; Llama's q/k rows are permuted
into llama.cpp's rotary layout (transformers undoes it when loading ``gguf_file=``). The
tokenizer (byte-level BPE: vocab, merges, special ids) and the training chat template go into
the metadata, so the file chats and stops like the folder it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from xtuner_lite.atomic import partial_path, publish, remove
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import EMBEDDED_MODELS, embedded_model_dir, load_model, load_tokenizer

# HF model_type → (GGUF architecture, permute q/k into llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
DTYPES = ("f32", "f16", "bf16", "q8_0")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _permute_rotary(weight, n_head: int):
    """HF's half-split rotary rows → llama.cpp's interleaved pairs (inverse of transformers'
    ``_reverse_permute_weights``)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    return float(theta if theta is not None else params.get("rope_theta", 10000.0))


def _check_rope(config: Any, folder: Path) -> None:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind != "default":
        raise XtunerError(
            f"{folder}: rope scaling {kind!r} is not supported by the GGUF export "
            "yet (supported: none)"
        )


def _tokenizer_fields(tokenizer: Any, vocab_size: int, folder: Path) -> dict[str, Any]:
    """Vocabulary, token types and merges of a byte-level BPE tokenizer, GGUF-style."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise XtunerError(f"{folder}: the GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise XtunerError(
            f"{folder}: only byte-level BPE tokenizers (GPT-2 style: Llama-3, Qwen2, "
            f"SmolLM2) can be exported to GGUF yet; this one is {model.get('type')}"
        )
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise XtunerError(
            f"{folder}: tokenizer has id {max(id_to_token)} but the model's "
            f"vocab_size is {vocab_size}"
        )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(id_to_token[i])
        if i in added:
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def default_pre_tokenizer(folder: Path) -> str:
    """llama.cpp's pre-tokenizer name when the folder is (merged from) an embedded model."""

    meta_file = folder / "xtuner_lite.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    base = str(meta.get("merged_from", {}).get("base_model", "")).lower()
    for name, spec in EMBEDDED_MODELS.items():
        if base == name or folder.resolve() == embedded_model_dir(spec.name).resolve():
            return spec.gguf_pre
    return "default"


def export_gguf(
    merged: str | Path,
    out: str | Path,
    dtype: str = "f16",
    pre_tokenizer: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``out`` from a merged folder (``xtuner merge`` output or any HF Llama/Qwen2 folder).

    ``pre_tokenizer`` is llama.cpp's name for the model's pre-tokenizer regex (``smollm``,
    ``llama-bpe``, ``qwen2``, ...; default: known for embedded models, else ``default``);
    transformers ignores it, llama.cpp uses it to split text."""

    folder, out = Path(merged), Path(out)
    if not (folder / "config.json").exists():
        raise XtunerError(
            f"{folder} is not a model folder (no config.json); merge the adapter "
            "first with `xtuner merge`"
        )
    if dtype not in DTYPES:
        raise XtunerError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if out.exists() and not force:
        raise XtunerError(f"{out} exists; pass --force to replace it")
    model = load_model(str(folder), dtype="float32")
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise XtunerError(
            f"{folder}: model_type {config.model_type!r} cannot be exported to "
            f"GGUF yet (supported: {sorted(ARCHITECTURES)})"
        )
    _check_rope(config, folder)
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tokenizer = load_tokenizer(str(folder))
    vocab = _tokenizer_fields(tokenizer, config.vocab_size, folder)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(folder.resolve().name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or default_pre_tokenizer(folder))
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    eos = model.generation_config.eos_token_id
    end_of_turn = [
        i
        for i in (eos if isinstance(eos, list) else [eos])
        if i is not None and i != tokenizer.eos_token_id
    ]
    if end_of_turn:  # the template's end of turn, so llama.cpp stops where our chat stops
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    quant = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }.get(dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise XtunerError(f"{folder}: no GGUF name for weight {hf_name!r}")
        data = tensor.detach().to(torch.float32).numpy()
        if permute and gguf_name.endswith(".attn_q"):
            data = _permute_rotary(data, config.num_attention_heads)
        elif permute and gguf_name.endswith(".attn_k"):
            data = _permute_rotary(data, config.num_key_value_heads)
        name = f"{gguf_name}.{suffix}"
        if quant is None or data.ndim == 1:  # norms and biases stay f32, as llama.cpp keeps them
            writer.add_tensor(name, np.ascontiguousarray(data))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data, quant)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=quant)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        remove(tmp)
        raise
    writer.close()
    publish(tmp, out)
    return out
