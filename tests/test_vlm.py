"""Image-text models: the LLaVA composition as transformers loads it, image data, the packed
step, what trains."""

import base64
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from xtuner_lite.data.image_text import ImageTextDataset, process_image_dataset
from xtuner_lite.data.images import IMAGE_INPUTS, placed_before
from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.errors import DataError, XtunerError
from xtuner_lite.hub import load_tokenizer
from xtuner_lite.inference.images import ImageInput
from xtuner_lite.model import build_model
from xtuner_lite.model.forward import loss_sum
from xtuner_lite.model.vlm import IMAGE_TOKEN, model_image_inputs, parts_of

from conftest import loss_curve, nonzero_lora_b, train_cmd, write_config, write_images

pytestmark = pytest.mark.integration

PER_IMAGE = 16  # TINY_VISION: 16×16 images in 4×4 patches
QUESTION = "What is it?"
PENALTY = 2.0  # random weights repeat one token without a repetition penalty


def _rows(names: list[str]) -> list[dict]:
    """A LLaVA row (one image) and a LLaMA-Factory row (two; ``_content_parts_row`` is the
    third shape)."""
    return [
        {"image": names[0], "conversations": [
            {"from": "human", "value": "What is in the picture?"},
            {"from": "gpt", "value": "A pattern of coloured squares."}]},
        {"messages": [
            {"role": "user", "content": f"{IMAGE_TOKEN}{IMAGE_TOKEN} Are these the same?"},
            {"role": "assistant", "content": "No, they differ."}],
         "images": [names[1], names[0]]},
    ]  # fmt: skip


def _write(folder, rows) -> str:
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return str(path)


def _dataset(tiny_llava, data, **kwargs):
    kwargs = {"template": "smollm2", "max_length": 256, **kwargs}
    processed = process_image_dataset(data, tiny_llava, tiny_llava, **kwargs)
    return ImageTextDataset(processed.data, processed.stats)


def _content_parts_row(path) -> dict:
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "Noise."}]}  # fmt: skip


def test_composed_llava_is_what_transformers_loads_and_its_processor_agrees(tiny_llava, tmp_path):
    """The composed folder loads as transformers' LlavaForConditionalGeneration, its logits
    equal the model we train (before any adapter); transformers' processor expands
    ``<image>`` to the same tokens and pixels as our data pipeline."""
    names = write_images(tmp_path, 3)
    dataset = _dataset(tiny_llava, _write(tmp_path, _rows(names)), pack=False)
    row = next(dataset[i] for i in range(len(dataset)) if len(dataset[i]["images"]) == 1)
    ours = build_model(tiny_llava, method="full", dtype="fp32").eval()
    theirs = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    assert type(theirs).__name__ == "LlavaForConditionalGeneration"
    ids = torch.tensor([row["input_ids"]])
    pixels = dataset.data.images.load(row["images"])["pixel_values"]
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected)
    processor = AutoProcessor.from_pretrained(tiny_llava)
    from PIL import Image

    out = processor(
        images=[Image.open(tmp_path / names[0])], text=f"{IMAGE_TOKEN}hi", return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((out["input_ids"][0] == image_id).sum()) == PER_IMAGE
    assert torch.equal(out["pixel_values"][0], pixels[0])


def test_image_rows_in_every_shape_expand_their_images_and_never_train_them(tiny_llava, tmp_path):
    names = write_images(tmp_path, 3)
    rows = _rows(names) + [_content_parts_row(tmp_path / names[2])]
    dataset = _dataset(tiny_llava, _write(tmp_path, rows), pack=False)
    image_id = dataset.data.rows.input_ids.max()  # <image> is the last token of the vocabulary
    counts = sorted(len(dataset[i]["images"]) for i in range(len(dataset)))
    assert counts == [1, 1, 2]
    assert len(dataset.data.images) == 3  # img0 is used twice: decoded once
    assert len(list(dataset.data.images.folder.glob("*.pt"))) == 3  # kept on disk
    for i in range(len(dataset)):
        row = dataset[i]
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        assert int((ids == image_id).sum()) == PER_IMAGE * len(row["images"])
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        at = torch.nonzero(ids == image_id)[:, 0].tolist()
        breaks = [0] + [k + 1 for k, (a, b) in enumerate(zip(at, at[1:])) if b != a + 1]
        runs = [end - start for start, end in zip(breaks, breaks[1:] + [len(at)])]
        assert all(n % PER_IMAGE == 0 for n in runs)  # whole images (adjacent ones join)
        assert (labels != IGNORE_INDEX).any()
    packed = _dataset(tiny_llava, _write(tmp_path, rows), pack=True)
    assert len(packed) == 1 and sorted(packed[0]["images"]) == [0, 0, 1, 2]


def test_bad_images_are_errors_naming_file_and_row_or_counted_skips(tiny_llava, tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "cut.png").write_bytes((tmp_path / names[1]).read_bytes()[:60])
    good = _rows(names)[0]
    cases = {
        "missing.png": "No such file",
        "cut.png": "cannot be read",
        "https://example.com/a.png": "remote URL",
    }
    for image, message in cases.items():
        data = _write(tmp_path, [good, {**good, "image": image}])
        with pytest.raises(DataError, match=message) as error:
            _dataset(tiny_llava, data)
        assert "data.json" in str(error.value) and "row 1" in str(error.value)
    mismatch = {"messages": _rows(names)[1]["messages"], "images": [names[0]]}
    with pytest.raises(DataError, match="2 <image> placeholders for 1 images"):
        _dataset(tiny_llava, _write(tmp_path, [good, mismatch]))
    rows = [good, {**good, "image": "missing.png"}, {**good, "image": "cut.png"}, mismatch]
    dataset = _dataset(tiny_llava, _write(tmp_path, rows), skip_invalid=True)
    assert dataset.stats.samples == 1 and sum(dataset.stats.rows_skipped.values()) == 3
    data = _write(tmp_path, [good, _rows(names)[1]])
    full = _dataset(tiny_llava, data, pack=False)
    two = next(dataset for dataset in (full[0], full[1]) if len(dataset["images"]) == 2)
    image_id = max(two["input_ids"])
    last = max(i for i, t in enumerate(two["input_ids"]) if t == image_id)
    cut = _dataset(tiny_llava, data, max_length=len(two["input_ids"]) - 2)  # the answer's end
    assert cut.stats.samples == 2 and cut.stats.rows_truncated == 1
    short = _dataset(tiny_llava, data, max_length=last)  # would cut the second image
    assert any("image tokens reach past max_length" in r for r in short.stats.rows_skipped)
    assert all(len(short[i]["images"]) < 2 for i in range(len(short)))


# conftest's tiny image-text families
VLMS = ["tiny_llava", "tiny_llava_next", "tiny_internvl", "tiny_qwen2_vl", "tiny_qwen2_5_vl",
        "tiny_smolvlm"]  # fmt: skip
SHAPES = [(12, 12), (16, 28), (20, 44)]  # (height, width): Qwen2-VL gives each its own count


@pytest.fixture(params=VLMS)
def tiny_vlm(request) -> str:
    """Each tiny image-text family in turn (``PeftCommonTester``'s way: one test, every
    model)."""
    return request.getfixturevalue(request.param)


def test_packed_step_equals_each_sample_alone(tiny_vlm, tmp_path):
    """LoRA on the language model, the projector trained: the packed row's loss and every
    gradient equal the sums over the samples run one by one (Qwen2-VL: images of three sizes,
    so three token counts, and its rotary positions per sample; InternVL: one or three tiles)."""
    names = write_images(tmp_path, 3, shapes=SHAPES)
    rows = _rows(names) + [_content_parts_row(tmp_path / names[2])]
    data = _write(tmp_path, rows)
    model = build_model(tiny_vlm, method="lora", lora=dict(r=4, alpha=8, dropout=0.0))
    nonzero_lora_b(model, 0.05)

    def run(batches) -> tuple[float, dict]:
        model.zero_grad()
        total = sum(loss_sum(model, b)[0] for b in batches)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(total.detach()), grads

    packed = _dataset(tiny_vlm, data, pack=True, max_length=512)
    alone = _dataset(tiny_vlm, data, pack=False, max_length=512)
    assert len(packed) == 1 and len(alone) == 3
    layouts = sorted(alone.data.images.layouts)
    if "qwen" in tiny_vlm:
        assert len(set(layouts)) == 3  # a count per image size
    if "internvl" in tiny_vlm:
        assert layouts == [4, 12, 12]  # one tile, or two and a thumbnail
    if "smolvlm" in tiny_vlm:
        assert layouts == [(1, 2), (2, 2), (2, 2)]  # rows and columns of tiles
    if "llava_next" in tiny_vlm:
        assert len(set(layouts)) > 1  # a count by the tiles each image's size picks
    for i in range(3):  # each sample's logits are the model's own forward's on it
        batch = alone.collate([alone[i]], 2)
        assert_model_logits(model, batch)
    loss_packed, grads_packed = run([packed.collate([packed[0]], 2)])
    loss_alone, grads_alone = run([alone.collate([alone[i]], 2) for i in range(3)])
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    assert any(f"{parts_of(model).projector}." in n for n in grads_packed)
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_alone[name], rtol=1e-4, atol=1e-6)
        assert grad.abs().sum() > 0, name


def assert_model_logits(model, batch: dict) -> None:
    """Our decoder's logits on a one-sample batch equal the model's own forward's (which
    computes Qwen2-VL's rotary positions itself)."""
    from xtuner_lite.model.forward import base_and_head, decoder_hidden

    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    with torch.no_grad():
        expected = model(**model_inputs(model, batch["input_ids"][0].tolist(), images)).logits
        got = base_and_head(model)[1](decoder_hidden(model, batch))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_qlora_quantizes_the_language_model_and_trains_the_projector(tiny_vlm, tmp_path):
    """QLoRA: NF4 on the language model's linear layers (and the tower's with
    ``quantize_vision_tower``), never on the projector, which trains in full: a step's loss
    is finite and the projector and the adapter get gradients."""
    import bitsandbytes as bnb

    names = write_images(tmp_path, 2, shapes=SHAPES[:2])
    dataset = _dataset(tiny_vlm, _write(tmp_path, _rows(names)), pack=True)
    for quantize_tower in (False, True):
        model = build_model(tiny_vlm, method="qlora", lora=dict(r=4, alpha=8, dropout=0.0),
                            vision=dict(quantize_vision_tower=quantize_tower))  # fmt: skip
        parts = parts_of(model)
        quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert any(f".{parts.language_model}." in n for n in quantized)
        assert any(f".{parts.tower}." in n for n in quantized) == quantize_tower
        assert not any(f".{parts.projector}." in n for n in quantized)
        loss, _ = loss_sum(model, dataset.collate([dataset[0]], 2))
        loss.backward()
        assert torch.isfinite(loss)
        grads = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()]
        assert any(f".{parts.projector}." in n for n in grads)
        assert any("lora_B" in n for n in grads)
    with pytest.raises(XtunerError, match="quantize_vision_tower applies to method='qlora'"):
        build_model(tiny_vlm, method="lora", vision=dict(quantize_vision_tower=True))


def test_a_frozen_tower_runs_no_backward_under_checkpointing(tiny_vlm, tmp_path):
    """LoRA with gradient checkpointing: every gradient equals the one without; a frozen vision
    tower's checkpointed layers run once a step (not recomputed: no backward goes through
    them; but Qwen2-VL's, whose tower holds the trained merger), a tower with LoRA twice (its
    adapter gets gradients)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from xtuner_lite.model.vlm import part

    names = write_images(tmp_path, 2, shapes=SHAPES[:2])
    dataset = _dataset(tiny_vlm, _write(tmp_path, _rows(names)), pack=True, max_length=512)
    batch = dataset.collate([dataset[0]], 2)

    def run(**kwargs) -> tuple[dict, int]:
        torch.manual_seed(0)
        model = build_model(tiny_vlm, method="lora", lora=dict(r=4, alpha=8, dropout=0.0),
                            **kwargs)  # fmt: skip
        nonzero_lora_b(model, 0.05)
        model.train()  # (checkpointing runs in training mode only)
        tower = part(model, parts_of(model).tower)
        layer = next(m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer))
        calls = []  # (inside the layer: its own hooks stay outside the checkpoint)
        next(layer.children()).register_forward_hook(lambda *args: calls.append(1))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss_sum(model, batch)[0].backward()
        # a tower without autograd is not wrapped in checkpoints that would have nothing to keep
        assert not [w for w in seen if "None of the inputs have requires_grad" in str(w.message)]
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, _ = run()
    checkpointed, calls = run(gradient_checkpointing=True)
    assert calls == (2 if "qwen" in tiny_vlm else 1) and checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
    adapted, calls = run(gradient_checkpointing=True, vision=dict(lora_vision_tower=True))
    assert calls == 2
    assert any(f".{parts_of(build_model(tiny_vlm)).tower}." in n and "lora_B" in n
               for n in adapted)  # fmt: skip


def test_image_max_pixels_bounds_a_grid_models_images_in_training_and_its_result(
    tiny_qwen2_vl, tmp_path
):
    """Qwen2-VL's tokens follow an image's size: ``image_max_pixels`` resizes larger images
    down (aspect kept), and the result keeps that bound for chat and serve."""
    from transformers import AutoImageProcessor

    from xtuner_lite.training.result import save_result

    names = write_images(tmp_path, 3, shapes=SHAPES)
    data = _write(tmp_path, _rows(names) + [_content_parts_row(tmp_path / names[2])])
    full = _dataset(tiny_qwen2_vl, data, pack=False)
    small = _dataset(tiny_qwen2_vl, data, pack=False, image_max_pixels=16 * 16)
    assert max(small.data.images.layouts) < max(full.data.images.layouts)
    assert max(small.data.images.layouts) * 4 * 4**2 <= 16 * 16  # 2×2 merged 4-pixel patches
    with pytest.raises(XtunerError, match="image_max_pixels must be a positive integer"):
        _dataset(tiny_qwen2_vl, data, image_max_pixels=0)
    model = build_model(tiny_qwen2_vl, method="lora", lora=dict(r=4, alpha=8))
    cfg = {"model": {"pretrained": tiny_qwen2_vl}, "train": {},
           "train_dataset": {"image_max_pixels": 16 * 16}}  # fmt: skip
    tokenizer = load_tokenizer(tiny_qwen2_vl)
    save_result(model, tokenizer, get_template("smollm2"), cfg, tmp_path / "result")
    assert AutoImageProcessor.from_pretrained(tmp_path / "result").size["longest_edge"] == 256


def test_what_trains_in_an_image_text_model(tiny_vlm):
    """LoRA: the adapter on the language model's linear layers only, the projector in full,
    the vision tower frozen unless asked; full: the three freeze switches (Qwen2-VL's
    projector sits inside its tower and follows its own switch)."""
    lora = build_model(tiny_vlm, method="lora", lora=dict(r=4, alpha=8))
    parts = parts_of(lora)

    def where(name: str) -> str:
        for part in ("projector", "tower", "language_model"):
            if f".{getattr(parts, part)}." in name:
                return part
        return "projector" if name.endswith(parts.with_projector) else "head"

    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    adapted = [n for n in trained if "lora_" in n]
    assert adapted and {where(n) for n in adapted} == {"language_model"}
    assert {where(n) for n in trained} == {"language_model", "projector"}
    tower = build_model(tiny_vlm, method="lora", lora=dict(r=4, alpha=8),
                        vision=dict(lora_vision_tower=True, freeze_projector=True))  # fmt: skip
    trained = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert {where(n) for n in trained if "lora_" in n} == {"language_model", "tower"}
    assert "projector" not in {where(n) for n in trained}
    stage1 = dict(freeze_vision_tower=False, freeze_language_model=True)
    stage1 = build_model(tiny_vlm, method="full", vision=stage1)
    trained = {where(n) for n, p in stage1.named_parameters() if p.requires_grad}
    assert trained == {"tower", "projector"}
    projector_only = build_model(tiny_vlm, method="full",
                                 vision=dict(freeze_language_model=True))  # fmt: skip
    assert {where(n) for n, p in projector_only.named_parameters() if p.requires_grad} == {
        "projector"
    }
    with pytest.raises(XtunerError, match="model.vision: unknown key 'freeze_everything'"):
        build_model(tiny_vlm, method="full", vision=dict(freeze_everything=True))
    with pytest.raises(XtunerError, match="nothing would train"):
        build_model(tiny_vlm, method="full",
                    vision=dict(freeze_projector=True, freeze_language_model=True))  # fmt: skip


ANSWERS = {"dark.png": "The first.", "light.png": "The second."}
LETTERED = "Which picture is this?\nA. dark\nB. light\nAnswer:"  # answered A or B


@pytest.fixture(scope="module")
def taught_llava(tiny_llava, tmp_path_factory):
    """``xtuner train`` (objective vlm_sft, a full fine-tune, the vision tower frozen: a
    random 64-wide LM learns little through a LoRA under its frozen random head) teaches the
    tiny LLaVA to say which of two images it is shown, which the text alone cannot tell:
    (the run's folder, the folder of the images and data)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("taught_llava")
    for name, colour in zip(ANSWERS, ((10, 10, 40), (240, 230, 200))):
        Image.new("RGB", (12, 12), colour).save(folder / name)
    rows = [
        {"image": name, "conversations": [
            {"from": "human", "value": "Which picture is this?"},
            {"from": "gpt", "value": answer}]}
        for _ in range(8) for name, answer in ANSWERS.items()
    ] + [
        {"image": name, "conversations": [
            {"from": "human", "value": LETTERED}, {"from": "gpt", "value": letter}]}
        for _ in range(4) for name, letter in zip(ANSWERS, "AB")
    ]  # fmt: skip
    cfg = dict(
        model=dict(pretrained=tiny_llava, method="full"),
        objective=dict(type="vlm_sft"),
        train_dataset=dict(data_files=_write(folder, rows), tokenizer=tiny_llava,
                           processor=tiny_llava, template="smollm2", max_length=128),
        train=dict(batch_size=2, accumulative_counts=1, max_iters=60, lr=1e-2, dtype=None,
                   save_steps=100, log_interval=1, warmup_ratio=0, tensorboard=False),
    )  # fmt: skip
    config = write_config(folder / "vlm.py", cfg)
    out = subprocess.run(train_cmd(config, folder / "run"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "run", folder


def test_xtuner_train_teaches_a_tiny_llava_what_its_images_show(taught_llava, tiny_llava):
    """Loss falls; the result is a model folder with the processor, which transformers loads
    as it is, and whose greedy choice of every answer token follows the image."""
    run, folder = taught_llava
    losses = loss_curve(run)
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    result = run / "model"
    assert (result / "processor_config.json").exists()
    model = AutoModelForImageTextToText.from_pretrained(result).eval()
    dataset = _dataset(tiny_llava, str(folder / "data.json"), pack=False)
    for i in range(len(dataset)):  # every answer token, both questions
        row = dataset[i]
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids, **dataset.data.images.load(row["images"])).logits[0]
        trained = torch.nonzero(labels[1:] != IGNORE_INDEX)[:, 0]
        assert torch.equal(logits[trained].argmax(-1), labels[1:][trained])


def test_digits_demo_data_is_a_seeded_split_of_real_digits(tmp_path):
    from xtuner_lite.examples import digits

    train, test = digits.write_data(tmp_path)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(train_rows) + len(test_rows) == 2 * 1797
    assert {r["image"] for r in train_rows}.isdisjoint({r["image"] for r in test_rows})
    assert {r["kind"] for r in test_rows} == {"digit", "parity"}
    assert {r["digit"] for r in test_rows} == set(range(10))
    again, _ = digits.write_data(tmp_path / "again")
    assert again.read_text() == train.read_text()  # seeded
    assert digits.is_correct("digit", 7, "It is 7.") and not digits.is_correct("digit", 7, "1")
    assert digits.is_correct("parity", 4, "Yes, it is even.")
    assert not digits.is_correct("parity", 3, "Yes")


def test_check_dataset_shows_image_token_runs(tiny_llava, tmp_path):
    from rich.console import Console

    from xtuner_lite.commands.check_dataset import SHOW
    from xtuner_lite.objectives import build_objective

    names = write_images(tmp_path, 2)
    data = _write(tmp_path, _rows(names))
    cfg = dict(data_files=data, tokenizer=tiny_llava, processor=tiny_llava, template="smollm2")
    console = Console(record=True, width=200)
    stats = SHOW[build_objective({"type": "vlm_sft"}).data_kind](cfg, 2, console)
    shown = console.export_text()
    assert f"{IMAGE_TOKEN}×{PER_IMAGE}" in shown and f"{IMAGE_TOKEN}×{2 * PER_IMAGE}" in shown
    assert "image runs 1" in shown and "2 distinct images" in shown and stats.samples == 2


def model_inputs(model, prompt: list[int], images: dict | None) -> dict:
    """transformers' own inputs for a prompt and its images' inputs (Qwen2-VL's forward and
    generate also want each token's modality)."""
    inputs = {"input_ids": torch.tensor([prompt]), **model_image_inputs(model.config, images or {})}
    if images and "image_grid_thw" in images:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    return inputs


def image_prompts(model: str, names: list[str], folder) -> tuple:
    """(tokenizer, ImageInput, the rendered "<image>\\nWhat is it?" turn's ids, each image's
    (expanded prompt, image inputs)) as chat and serve make them, SmolLM2's template."""
    tokenizer = load_tokenizer(model)
    images = ImageInput(model, tokenizer)
    text = get_template("smollm2").render_prompt(
        [{"role": "user", "content": images.tokens.in_text(placed_before(QUESTION, 1))}],
        tokenizer,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer, images, ids, [images.prompt(ids, [name], folder) for name in names]


def greedy(model, prompt: list[int], images: dict | None, **kwargs) -> list[int]:
    """transformers.generate's 12 greedy new tokens (``kwargs``: its stops)."""
    out = model.generate(**model_inputs(model, prompt, images), max_new_tokens=12,
                         do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_engine_with_images_gives_transformers_greedy_tokens(tiny_vlm, tmp_path):
    """The bundled engine prefills image features and decodes: each row's greedy tokens equal
    transformers.generate's on the same expanded prompt and images, rows with different images
    (Qwen2-VL: of different sizes, so different lengths and rotary offsets) and a row without
    batched together; a prompt with images is served from the prefix cache of the same
    prompt and images, and not of the same text with another image."""
    from xtuner_lite.inference import InferenceEngine, SamplingParams

    names = write_images(tmp_path, 2, seed=5, shapes=SHAPES[1:])
    tokenizer, images, ids, prompts = image_prompts(tiny_vlm, names, tmp_path)
    plain = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    expected = [greedy(model, prompt, given, min_new_tokens=12)
                for prompt, given in prompts + [(plain, None)]]  # fmt: skip
    engine = InferenceEngine(model, tokenizer)
    # the first logits, and the next step's, are the model's on each prompt with its own
    # image (which changes them), then on it and the first token
    runner = InferenceEngine(model, tokenizer).runner
    logits, _ = runner.prefill([p for p, _ in prompts], [x for _, x in prompts])
    first = logits.argmax(-1)
    runner.feed(first)
    step = runner.decode()
    with torch.no_grad():
        for row, after, (prompt, given), token in zip(logits, step, prompts, first.tolist()):
            full = model(**model_inputs(model, prompt, given)).logits[0, -1]
            torch.testing.assert_close(row, full, rtol=1e-4, atol=1e-5)
            full = model(**model_inputs(model, prompt + [token], given)).logits[0, -1]
            torch.testing.assert_close(after, full, rtol=1e-4, atol=1e-5)
    if len(prompts[0][0]) == len(prompts[1][0]):  # (same length: the images alone differ)
        assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    # the same prompts again start from their cached blocks: those before the image, or with
    # the image's tokens among them (never a part of them); the rest (Qwen2-VL: at the rotary
    # positions of the whole prompt) gives the same logits
    runner.select(None)
    again, found = runner.prefill([p for p, _ in prompts], [x for _, x in prompts])
    token = model.config.image_token_id
    spans = [(p.index(token), len(p) - p[::-1].index(token)) for p, _ in prompts]
    assert all(0 < n <= start or n >= end for n, (start, end) in zip(found, spans))
    assert any(n >= end for n, (_, end) in zip(found, spans))
    runner.feed(first)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runner.decode(), step, rtol=1e-4, atol=1e-5)
    params = SamplingParams(max_new_tokens=12)
    requests = [engine.add_request(p, params, images=x) for p, x in prompts]
    requests.append(engine.add_request(plain, params))
    while engine.has_work:
        engine.step()
    assert [r.output_ids for r in requests] == expected
    # the same prompt and image again starts from its cached blocks, the image's tokens among
    # them (Qwen2-VL: the rest of the prompt and the reply at the rotary positions the whole
    # prompt gives them)
    again = engine.add_request(prompts[1][0], params, images=prompts[1][1])
    while engine.has_work:
        engine.step()
    assert again.output_ids == expected[1]
    assert again.cached_tokens >= spans[1][1]
    # the same text with another image (LLaVA, InternVL: the same tokens) finds only the
    # blocks before the image
    fresh = InferenceEngine(model, tokenizer)
    for prompt, given in prompts:
        request = fresh.add_request(prompt, params, images=given)
        while fresh.has_work:
            fresh.step()
    assert request.cached_tokens <= prompts[1][0].index(token)
    assert request.output_ids == expected[1]
    with pytest.raises(XtunerError, match="1 image placeholders for 2 images"):
        images.prompt(ids, names, tmp_path)


def test_loglik_scores_of_contexts_with_images_are_the_models(tiny_vlm, tmp_path):
    """Option log-likelihoods after contexts holding images (Qwen2-VL: of two sizes), batched
    with a text context: each equals the sum from the model's own forward on the whole
    sequence."""
    from xtuner_lite.evaluation.loglik import LoglikScorer

    names = write_images(tmp_path, 2, seed=3, shapes=SHAPES[1:])
    tokenizer = load_tokenizer(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    images = ImageInput(tiny_vlm, tokenizer)
    scorer = LoglikScorer(model, tokenizer)
    requests, given = [], []
    for name in names:
        context = images.tokens.in_text(f"{IMAGE_TOKEN}\nThe picture shows")
        for option in (" a cat", " noise and colours"):
            ids, cont = scorer.encode_pair(context, option)
            ids, inputs = images.prompt(ids, [name], tmp_path)
            requests.append((ids, cont))
            given.append(inputs)
    requests.append(scorer.encode_pair("Hello there,", " friend"))
    given.append(None)
    scores = scorer.score_ids(requests, images=given)
    with torch.no_grad():
        for (context, cont), inputs, score in zip(requests, given, scores):
            logits = model(**model_inputs(model, context + cont, inputs)).logits[0].float()
            lp = logits[len(context) - 1 : -1].log_softmax(-1)
            expected = lp.gather(1, torch.tensor(cont)[:, None]).sum()
            assert score.logprob == pytest.approx(float(expected), abs=1e-4)
    assert scores[0].logprob != pytest.approx(scores[2].logprob, abs=1e-4)  # the image counts


def test_chat_with_an_image_answers_as_transformers_generate(taught_llava):
    """``ChatSession.ask(..., images=[file])`` (``xtuner chat --image``) on the taught model:
    each image gets its own answer, transformers.generate's on the same expanded prompt and
    pixels; ``<image>`` typed as text is escaped, so it makes no image token; a text model
    refuses images."""
    from xtuner_lite.commands.chat import ChatSession, GenerationOptions

    run, folder = taught_llava
    model = AutoModelForImageTextToText.from_pretrained(run / "model").eval()
    options = GenerationOptions(max_new_tokens=8)
    for name, answer in ANSWERS.items():
        session = ChatSession(str(run / "model"), template="smollm2", options=options)
        assert session.ask("Which picture is this?", images=[str(folder / name)]) == answer
        user = dict(session.history[0])  # the turn as the session keeps it, its image attached
        session.reset()
        prompt, given = session._prompt([user])
        out = model.generate(torch.tensor([prompt]), **given, max_new_tokens=8,
                             do_sample=False, eos_token_id=session.chat.stop_ids,
                             pad_token_id=0)  # fmt: skip
        expected = session.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        assert expected.strip() == answer
    typed = session.chat.prompt_ids([{"role": "user", "content": f"{IMAGE_TOKEN} hi"}])
    assert session.images.tokens.token_id not in typed
    with pytest.raises(XtunerError, match="--image needs an image-text model"):
        ChatSession("smollm2-135m-instruct", options=options).ask("hi", images=["a.png"])


def test_serve_reads_image_content_parts(taught_llava, tmp_path):
    """``xtuner serve`` on the taught model, the openai client: an image part (a data URL, or
    a file on the server) gets that image's answer; a remote URL is a 400 that says nothing is
    fetched, an unreadable image a 400 naming it, an image in an assistant turn a 400."""
    import openai

    from conftest import start_server

    run, folder = taught_llava
    dark = "data:image/png;base64," + base64.b64encode((folder / "dark.png").read_bytes()).decode()
    proc, (host, port) = start_server(str(run / "model"), "--template", "smollm2")
    try:
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0)

        def ask(image: str) -> str:
            parts = [{"type": "image_url", "image_url": {"url": image}},
                     {"type": "text", "text": "Which picture is this?"}]  # fmt: skip
            reply = client.chat.completions.create(
                model="model", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": parts}],
            )  # fmt: skip
            return reply.choices[0].message.content

        assert ask(dark) == ANSWERS["dark.png"]
        assert ask(str(folder / "light.png")) == ANSWERS["light.png"]
        with pytest.raises(openai.BadRequestError, match="not fetched"):
            ask("https://example.com/cat.png")
        with pytest.raises(openai.BadRequestError, match="missing.png"):
            ask(str(tmp_path / "missing.png"))
        parts = [{"type": "image_url", "image_url": {"url": dark}}]
        with pytest.raises(openai.BadRequestError, match="only user messages carry images"):
            messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts}]
            client.chat.completions.create(model="model", messages=messages)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_round_trip_with_the_openai_client(tiny_vlm, tmp_path):
    """Every family through ``xtuner serve`` and the openai client: an image part (a data URL,
    then a file on the server) expands to that image's tokens (the prompt's token count in
    ``usage``) and the reply is transformers.generate's greedy text (with the same repetition
    penalty)."""
    import openai

    from conftest import start_server

    names = write_images(tmp_path, 2, seed=7, shapes=SHAPES[1:])
    tokenizer, _, _, prompts = image_prompts(tiny_vlm, names, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    stops = stop_token_ids(get_template("smollm2"), tokenizer)
    penalized = dict(eos_token_id=stops, repetition_penalty=PENALTY)
    replies = [greedy(model, prompt, given, **penalized) for prompt, given in prompts]
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in replies]
    first = (tmp_path / names[0]).read_bytes()
    urls = ["data:image/png;base64," + base64.b64encode(first).decode(), str(tmp_path / names[1])]
    proc, (host, port) = start_server(tiny_vlm, "--template", "smollm2")
    try:
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0)
        for url, (prompt, _), text in zip(urls, prompts, expected):
            parts = [{"type": "image_url", "image_url": {"url": url}},
                     {"type": "text", "text": QUESTION}]  # fmt: skip
            reply = client.chat.completions.create(
                model=Path(tiny_vlm).name, max_tokens=12, temperature=0,
                extra_body={"repetition_penalty": PENALTY},
                messages=[{"role": "user", "content": parts}],
            )  # fmt: skip
            assert reply.usage.prompt_tokens == len(prompt)
            assert reply.choices[0].message.content == text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_merged_image_text_adapter_is_the_adapter(tiny_vlm, tmp_path):
    """A LoRA result of an image-text model (adapter on the language model, the projector
    trained in full) merged by ``xtuner merge``: transformers loads the folder with its
    processor, and its logits on a prompt with an image equal the adapter's."""
    from transformers import AutoImageProcessor

    from xtuner_lite.commands.merge import merge_adapter
    from xtuner_lite.training.result import save_result

    model = build_model(tiny_vlm, method="lora", lora=dict(r=4, alpha=8, dropout=0.0))
    nonzero_lora_b(model, 0.05)
    projector = f"{parts_of(model).projector}."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if projector in name and param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))  # as if stage 2 moved it
    tokenizer = load_tokenizer(tiny_vlm)
    cfg = {"model": {"pretrained": tiny_vlm, "method": "lora"}, "train_dataset": {},
           "train": {}}  # fmt: skip
    save_result(model, tokenizer, get_template("smollm2", tokenizer), cfg, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "xtuner_lite.json").read_text())
    assert meta["architecture"]["model_type"] == model.config.model_type
    assert meta["architecture"]["hidden_size"] == 64  # the language model's
    merged = merge_adapter(None, str(tmp_path / "adapter"), str(tmp_path / "merged"), "fp32")
    names = write_images(tmp_path, 2, shapes=SHAPES[1:])
    dataset = _dataset(tiny_vlm, _write(tmp_path, _rows(names)[:1]), pack=False)
    row = dataset[0]
    given = dataset.data.images.load(row["images"])
    loaded = AutoModelForImageTextToText.from_pretrained(merged).eval()
    with torch.no_grad():
        expected = model.eval()(**model_inputs(model, row["input_ids"], given)).logits
        got = loaded(**model_inputs(loaded, row["input_ids"], given)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert AutoImageProcessor.from_pretrained(merged).to_dict() == (
        AutoImageProcessor.from_pretrained(tiny_vlm).to_dict()
    )
    merged_tokenizer = load_tokenizer(merged)
    assert "<|im_start|>" in merged_tokenizer.chat_template  # the training template
    if "llava" in tiny_vlm:
        processor = AutoProcessor.from_pretrained(merged)
        assert processor.chat_template == processor.tokenizer.chat_template


def test_compose_with_a_pretrained_vision_encoder_keeps_its_weights(tiny_llama, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from xtuner_lite.model.vlm import compose_llava

    from conftest import TINY_VISION

    config = SiglipVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})
    encoder = SiglipVisionModel(config)
    encoder.save_pretrained(tmp_path / "encoder")
    out = compose_llava(tiny_llama, None, tmp_path / "llava", vision_model=tmp_path / "encoder")
    kept = AutoModelForImageTextToText.from_pretrained(out).model.vision_tower.state_dict()
    for name, value in encoder.state_dict().items():
        if name.removeprefix("vision_model.").startswith("head."):
            assert name not in kept  # SigLIP's pooling head: LLaVA never reads it
        else:
            assert torch.equal(kept[name], value), name
    # stored in the dtype asked for: bf16 weights equal the fp32 ones rounded
    half = compose_llava(tiny_llama, None, tmp_path / "bf16", vision_model=tmp_path / "encoder",
                         dtype="bfloat16")  # fmt: skip
    with safe_open(str(half / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.bfloat16}
    rounded = AutoModelForImageTextToText.from_pretrained(half).model.vision_tower.state_dict()
    for name, value in kept.items():
        assert torch.equal(rounded[name], value.to(torch.bfloat16)), name


def test_eval_image_tasks_show_each_row_its_image(taught_llava):
    """``xtuner eval`` tasks with an ``image`` field on the taught model: a generation task, a
    lettered multiple-choice task scored by the model's written letter, and one scored by the
    options' log-likelihoods get every row right; the same rows with each other's images get
    every row wrong."""
    from xtuner_lite.evaluation.evaluator import evaluate_model
    from xtuner_lite.evaluation.tasks import TaskSpec
    from xtuner_lite.inference.loader import load_for_inference

    run, folder = taught_llava
    rows = [{"picture": name, "other": other, "answer": ANSWERS[name], "letter": letter,
             "choices": ["dark", "light"], "answers": list(ANSWERS.values())}
            for (name, letter), other in zip(zip(ANSWERS, "AB"), reversed(ANSWERS))]  # fmt: skip
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(data=str(folder / "eval.jsonl"), chat=True, max_new_tokens=8)
    tasks = [
        TaskSpec(name="which", kind="generate", prompt="Which picture is this?",
                 image="picture", **common),
        TaskSpec(name="lettered", kind="mcq", style="letter", scoring="generate",
                 prompt="Which picture is this?\n{options}\nAnswer:", answer="letter",
                 circular=False, image="picture", **common),
        TaskSpec(name="likely", kind="mcq", style="cloze", scoring="loglik",
                 prompt="Which picture is this?", continuation="{choice}", choices="answers",
                 answer="letter",
                 image="picture", **common),
    ]  # fmt: skip
    model = load_for_inference(str(run / "model"), template="smollm2")
    results = evaluate_model(model, tasks)
    assert {name: r.metrics["acc"] for name, r in results.items()} == dict.fromkeys(results, 1.0)
    swapped = [TaskSpec(**{**t.__dict__, "image": "other"}) for t in tasks]
    results = evaluate_model(model, swapped)
    assert {name: r.metrics["acc"] for name, r in results.items()} == dict.fromkeys(results, 0.0)
    with pytest.raises(XtunerError, match="images need kind 'generate' or 'mcq'"):
        TaskSpec(name="x", data="x", kind="perplexity", image="picture")
