"""``xtuner export gguf``: a merged Hugging Face folder → one GGUF file (llama.cpp, Ollama, ...).

Tensor names come from the ``gguf`` package's own HF → GGUF table; Llama's q/k rows are permuted
into llama.cpp's rotary layout (transformers undoes it when loading ``gguf_file=``). The
tokenizer (byte-level BPE: vocab, merges, special ids) and the training chat template go into
the metadata, so the file chats and stops like the folder it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import gguf
import numpy as np
import torch

from xtuner_lite.atomic import partial_path, publish, remove
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import EMBEDDED_MODELS, embedded_model_dir, load_model, load_tokenizer
from xtuner_lite.values import Flag

# HF model_type → (GGUF architecture, permute q/k into llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
DTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
QUANT_TYPES = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
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
    merged: str,
    out: str,
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
    pre_tokenizer: Annotated[str | None, Flag(flags=("--pre",))] = None,
    force: bool = False,
) -> Path:
    """Export a merged folder to a GGUF file (llama.cpp, Ollama).

    Writes OUT from a merged folder (`xtuner merge` output or any HF Llama/Qwen2 folder).

    Args:
        merged: merged model folder (`xtuner merge` output)
        out: output .gguf file
        dtype: the tensors' type in the file
        pre_tokenizer: llama.cpp pre-tokenizer name, e.g. smollm, llama-bpe, qwen2 (default:
            known for the embedded models, else 'default'); transformers ignores it, llama.cpp
            uses it to split text
        force: replace an existing file
    """
    folder, out = Path(merged), Path(out)
    _check_request(folder, out, dtype, force)
    model = load_model(str(folder), dtype="float32")
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise XtunerError(
            f"{folder}: model_type {config.model_type!r} cannot be exported to "
            f"GGUF yet (supported: {sorted(ARCHITECTURES)})"
        )
    _check_rope(config, folder)
    arch_name = ARCHITECTURES[config.model_type][0]
    tokenizer = load_tokenizer(str(folder))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(folder.resolve().name)
    writer.add_file_type(FILE_TYPES[dtype])
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, model, folder, pre_tokenizer or default_pre_tokenizer(folder))
    _add_tensors(writer, model, folder, dtype)
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
    print(f"GGUF written to {out}")
    return out


def _check_request(folder: Path, out: Path, dtype: str, force: bool) -> None:
    if not (folder / "config.json").exists():
        raise XtunerError(
            f"{folder} is not a model folder (no config.json); merge the adapter "
            "first with `xtuner merge`"
        )
    if dtype not in DTYPES:
        raise XtunerError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if out.exists() and not force:
        raise XtunerError(f"{out} exists; pass --force to replace it")


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any) -> None:
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


def _add_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, model: Any, folder: Path, pre_tokenizer: str
) -> None:
    """The BPE vocabulary, special tokens, the end of turn and the chat template."""
    vocab = _tokenizer_fields(tokenizer, model.config.vocab_size, folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
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


def _add_tensors(writer: gguf.GGUFWriter, model: Any, folder: Path, dtype: str) -> None:
    """Every weight under its GGUF name (q/k rows permuted for llama.cpp's rotary layout)."""
    config = model.config
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    quant = QUANT_TYPES.get(dtype)
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
