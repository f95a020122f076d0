"""``xtuner convert pth_to_hf``: a training checkpoint → the adapter (or model) folder.

A checkpoint (``iter_N.pth``) holds only the trainable weights (see ``TrainModel.state_dict``), so
the model is rebuilt from the config and the weights are loaded into it; every trainable weight
must be in the checkpoint and nothing else, or the config and checkpoint do not belong together.
"""

from __future__ import annotations

from pathlib import Path

from xtuner_lite.config import load_config
from xtuner_lite.data.pipeline import resolve_template, resolve_tokenizer
from xtuner_lite.errors import XtunerError
from xtuner_lite.model import build_model
from xtuner_lite.training import checkpoint as ckpt
from xtuner_lite.training.result import save_result
from xtuner_lite.values import CfgOptions

PREFIX = "llm."  # TrainModel keeps the causal LM as ``self.llm``


def read_checkpoint_weights(checkpoint: str | Path) -> dict:
    """The trainable weights of an ``iter_N.pth`` (keys relative to the causal LM), read
    without unpickling anything but tensors and plain data."""
    weights = ckpt.load(checkpoint)[ckpt.STATE_DICT]
    return {k.removeprefix("module.").removeprefix(PREFIX): v for k, v in weights.items()}


def pth_to_hf(
    config: str,
    checkpoint: str,
    out: str,
    cfg_options: CfgOptions | dict = None,
    force: bool = False,
) -> Path:
    """Convert a training checkpoint: iter_N.pth → peft adapter / HF model folder.

    Rebuild the config's model, load the checkpoint's weights and save it as `xtuner train`
    saves its result (peft adapter folder, or HF model folder for a full fine-tune).

    Args:
        config: the config the checkpoint was trained with
        checkpoint: WORK_DIR/iter_N.pth
        out: output folder
        cfg_options: override config keys
        force: replace an existing output folder
    """

    out = Path(out)
    if out.exists() and not force:
        raise XtunerError(f"output folder {out} exists; pass --force to replace it")
    weights = read_checkpoint_weights(checkpoint)
    cfg = load_config(config, cfg_options)
    for key in ("model", "train_dataset", "train"):
        if key not in cfg:
            raise XtunerError(f"config {config} has no {key!r} dict")
    llm = build_model(**dict(cfg["model"]))
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    missing = sorted(trainable - weights.keys())
    unexpected = sorted(weights.keys() - trainable)
    if missing or unexpected:
        detail = (
            f"{len(missing)} trainable weights missing (e.g. {missing[:2]})"
            if missing
            else f"{len(unexpected)} weights the model does not train (e.g. {unexpected[:2]})"
        )
        raise XtunerError(f"checkpoint {checkpoint} does not match config {config}: {detail}")
    params = dict(llm.named_parameters())
    for name, tensor in weights.items():
        if params[name].shape != tensor.shape:
            raise XtunerError(
                f"checkpoint {checkpoint}: {name} has shape {tuple(tensor.shape)}, "
                f"the config's model {tuple(params[name].shape)}"
            )
        params[name].data.copy_(tensor)
    data_cfg = dict(cfg["train_dataset"])
    tokenizer = resolve_tokenizer(data_cfg["tokenizer"])
    template = resolve_template(data_cfg.get("template"), tokenizer, data_cfg["tokenizer"])
    save_result(llm, tokenizer, template, cfg, out)
    print(f"converted {checkpoint} to {out}")
    return out
