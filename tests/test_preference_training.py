"""Preference objectives on packed data: packed == unpacked, cached reference == live, and the
data pipeline's pairs (templates, labels, truncation, errors)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from xtuner_lite.commands.train import train
from xtuner_lite.data.dataset import PreferenceDataset, collate_preference
from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.data.preference import process_preference_dataset, truncate_unit
from xtuner_lite.errors import DataError, XtunerError
from xtuner_lite.evaluation.run import run_eval
from xtuner_lite.model import build_model
from xtuner_lite.model.logprobs import logps_from_hidden
from xtuner_lite.objectives.preference.objective import DPOObjective, KTOObjective, SimPOObjective
from xtuner_lite.objectives.reference import (
    Reference,
    cached_reference,
    compute_reference,
    save_reference,
)

from conftest import (
    EXAMPLE_DATA,
    log_records,
    loss_curve,
    nonzero_lora_b,
    real_step,
    tiny_train_cfg,
)

PAIRS = EXAMPLE_DATA / "pref_mini.json"
UNPAIRED = EXAMPLE_DATA / "kto_mini.json"


def _dataset(tokenizer, path=PAIRS, kind="pairs", pack=True, max_length=128):
    processed = process_preference_dataset(
        str(path), tokenizer, kind=kind, template="chatml", max_length=max_length, pack=pack
    )
    return PreferenceDataset(processed.data, processed.stats)


def _perturbed_lora(path: str) -> torch.nn.Module:
    """A LoRA model whose adapter is not zero, so policy != reference."""
    torch.manual_seed(0)
    model = build_model(path, method="lora", lora=dict(r=4, alpha=8, dropout=0.0))
    nonzero_lora_b(model, std=0.05)
    return model


def _micro_batches(dataset: PreferenceDataset, per_batch: int) -> list[dict]:
    rows = [dataset[i] for i in range(len(dataset))]
    return [
        collate_preference(rows[i : i + per_batch], 2, 32) for i in range(0, len(rows), per_batch)
    ]


@pytest.mark.parametrize(
    "objective,kind",
    [
        (DPOObjective("sigmoid", beta=0.5), "pairs"),
        (SimPOObjective(beta=2.0, gamma=0.5), "pairs"),
        (KTOObjective(beta=0.5), "unpaired"),
    ],
    ids=["dpo", "simpo", "kto"],
)
def test_packed_equals_unpacked(tiny_llama, smol_tokenizer, objective, kind):
    """Same loss and gradients whether units are packed several to a row or one per row."""
    path = PAIRS if kind == "pairs" else UNPAIRED
    packed = _dataset(smol_tokenizer, path, kind, pack=True)
    unpacked = _dataset(smol_tokenizer, path, kind, pack=False)
    assert len(packed) < len(unpacked) == packed.stats.units
    model = _perturbed_lora(tiny_llama)
    # KTO's KL term is a mean over its micro-batch: one micro-batch each
    loss_a, grads_a = real_step(
        model, _micro_batches(packed, 3 if kind == "pairs" else 99), objective=objective
    )
    loss_b, grads_b = real_step(model, _micro_batches(unpacked, 99), objective=objective)
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["dpo", "kto", "reward"])
def test_shared_prompts_equal_separate_sequences(tiny_llama, smol_tokenizer, attention, name):
    """Each unit's prompt run once, its sequences branching from it: the loss and gradients
    of the sequences run one by one (fp32, rows packed with several units), for fewer tokens;
    reward models score each sequence's last token as before. With SDPA the rows are also
    joined into one."""
    from xtuner_lite.data.dataset import share_prompts
    from xtuner_lite.objectives.preference.objective import RewardObjective

    kind = "unpaired" if name == "kto" else "pairs"
    dataset = _dataset(smol_tokenizer, PAIRS if kind == "pairs" else UNPAIRED, kind, pack=True)
    torch.manual_seed(0)
    model = build_model(
        tiny_llama, method="lora", lora=dict(r=4, alpha=8, dropout=0.0),
        attn_implementation=attention, head="reward" if name == "reward" else "lm",
    )  # fmt: skip
    nonzero_lora_b(model, std=0.05)
    objectives = {
        "dpo": lambda share: DPOObjective("sigmoid", beta=0.5, share_prompts=share),
        "kto": lambda share: KTOObjective(beta=0.5, share_prompts=share),
        "reward": lambda share: RewardObjective(share_prompts=share),
    }
    batches = _micro_batches(dataset, 3 if kind == "pairs" else 99)
    shared = share_prompts(batches[0], 2, 32)
    assert int(shared["num_tokens"]) < int(batches[0]["num_tokens"])
    assert int(shared["num_sequences"]) == int(batches[0]["num_sequences"]) >= 4
    prepared = objectives[name](True).prepare(model, batches[:1], 0)[0]
    rows = 1 if attention == "sdpa" else batches[0]["input_ids"].shape[0]  # sdpa: no padding
    assert prepared["input_ids"].shape[0] == rows and batches[0]["input_ids"].shape[0] > 1
    loss_a, grads_a = real_step(model, batches, objective=objectives[name](True))
    loss_b, grads_b = real_step(model, batches, objective=objectives[name](False))
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6)


def test_cached_reference_equals_live(tiny_llama, smol_tokenizer):
    dataset = _dataset(smol_tokenizer)
    model = _perturbed_lora(tiny_llama)
    objective = DPOObjective("sigmoid", beta=0.5)
    live_loss, live_grads = real_step(model, _micro_batches(dataset, 2), objective=objective)
    dataset.reference = compute_reference(model, Reference(), dataset, 2, 2, "cpu")
    batches = _micro_batches(dataset, 2)
    assert all("ref_logps" in b for b in batches)
    cached_loss, cached_grads = real_step(model, batches, objective=objective)
    assert abs(live_loss - cached_loss) < 1e-5
    for name in live_grads:
        torch.testing.assert_close(live_grads[name], cached_grads[name], rtol=1e-4, atol=1e-6)


def test_pairs_share_the_prompt_and_train_only_responses(smol_tokenizer):
    dataset = _dataset(smol_tokenizer, pack=False)
    row = dataset[0]
    a, b, c = row["cu_seqlens"]
    chosen, rejected = row["input_ids"][a:b], row["input_ids"][b:c]
    labels = row["labels"]
    prompt = next(i for i, x in enumerate(labels[a:b]) if x != IGNORE_INDEX)
    assert chosen[:prompt] == rejected[:prompt]  # one prompt, tokenized once
    assert labels[b : b + prompt] == [IGNORE_INDEX] * prompt
    text = smol_tokenizer.decode(chosen[:prompt])
    assert text.endswith("<|im_start|>assistant\n")
    trained = smol_tokenizer.decode([t for t in labels[a:b] if t != IGNORE_INDEX])
    assert trained.endswith("<|im_end|>")  # the end-of-turn token is trained
    row_text = json.loads(PAIRS.read_text())
    assert any(trained.startswith(r["chosen"]["value"]) for r in row_text)


def test_pairs_render_as_the_tokenizers_own_chat_template(smol_tokenizer):
    """Prompt and response, tokenized apart, decode to exactly the tokenizer's jinja rendering
    of the conversation (SmolLM2's template, default system prompt included)."""
    processed = process_preference_dataset(
        str(PAIRS), smol_tokenizer, template="smollm2", max_length=256, pack=False, shuffle=False
    )
    rows = json.loads(PAIRS.read_text())
    row = processed.data.row(0)
    a, b, c = row["cu_seqlens"]
    for side, (lo, hi) in (("chosen", (a, b)), ("rejected", (b, c))):
        conversation = [
            {"role": "user", "content": rows[0]["conversations"][0]["value"]},
            {"role": "assistant", "content": rows[0][side]["value"]},
        ]
        jinja = smol_tokenizer.apply_chat_template(conversation, tokenize=False)
        assert smol_tokenizer.decode(row["input_ids"][lo:hi]) == jinja


def test_truncation_trims_prompt_first_then_responses_alike():
    prompt = list(range(100))
    responses = [(list(range(30)), list(range(30))), (list(range(50)), list(range(50)))]
    p, r, trimmed, cut = truncate_unit(prompt, responses, 120)
    assert (len(p), [len(x) for x, _ in r], trimmed, cut) == (70, [30, 50], True, False)
    assert p == prompt[30:]  # from the left
    p, r, trimmed, cut = truncate_unit(prompt, [(list(range(200)), list(range(200)))] * 2, 120)
    assert (len(p), [len(x) for x, _ in r], trimmed, cut) == (60, [60, 60], True, True)


@pytest.mark.parametrize(
    "row,field,message",
    [
        (
            {"conversations": [{"from": "human", "value": "hi"}], "rejected": "no"},
            "chosen",
            "missing",
        ),
        ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
        ({"prompt": "hi", "chosen": 3, "rejected": "x"}, "chosen", "expected a string"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "x"}, "chosen", "empty"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, smol_tokenizer, row, field, message):
    good = {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, row, good)) + "\n")
    with pytest.raises(DataError) as err:
        process_preference_dataset(str(path), smol_tokenizer, template="chatml", use_cache=False)
    text = str(err.value)
    assert str(path) in text and "line 2" in text and repr(field) in text and message in text
    skipped = process_preference_dataset(
        str(path), smol_tokenizer, template="chatml", use_cache=False, skip_invalid=True
    )
    assert skipped.stats.units == 2 and sum(skipped.stats.rows_skipped.values()) == 1


@pytest.mark.parametrize("content,message", [("", "empty"), ("[{", "line 1")])
def test_empty_or_invalid_file_is_named(tmp_path, smol_tokenizer, content, message):
    path = tmp_path / "pairs.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        process_preference_dataset(str(path), smol_tokenizer, template="chatml", use_cache=False)
    assert str(path) in str(err.value)


def test_kto_rows_need_a_boolean_label(tmp_path, smol_tokenizer):
    path = tmp_path / "kto.json"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps([{**row, "label": True}, {**row, "label": "yes"}]))
    with pytest.raises(DataError, match="row 1.*'label'.*true or false"):
        process_preference_dataset(
            str(path), smol_tokenizer, kind="unpaired", template="chatml", use_cache=False
        )
    # a row without its label is named for the label (it was reported as "'chosen': missing")
    for unlabelled in (row, {"prompt": "a", "completion": "b"}):
        path.write_text(json.dumps([{**row, "label": True}, unlabelled]))
        with pytest.raises(DataError, match="row 1.*'label'.*missing"):
            process_preference_dataset(
                str(path), smol_tokenizer, kind="unpaired", template="chatml", use_cache=False
            )


@pytest.mark.parametrize("head_trained", [True, False])
def test_sequence_logps_and_gradients_equal_plain_log_softmax(head_trained):
    """The chunked log-prob function against autograd on full logits, for hidden states and a
    trained head (logits recomputed per chunk in backward) or a frozen one (the gradient's
    direction prepared in forward)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double().requires_grad_(head_trained)
    labels = torch.randint(0, 50, (2, 12))
    labels[:, :3] = IGNORE_INDEX
    seq_index = torch.tensor([[0] * 6 + [1] * 6, [2] * 8 + [-1] * 4])
    labels[1, 8:] = IGNORE_INDEX
    batch = {"labels": labels, "seq_index": seq_index, "num_sequences": torch.tensor(3)}
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    ours = logps_from_hidden(hidden, head, batch, chunk_size=5)
    (ours.total.double() * weights).sum().backward()
    params = [hidden, head.weight, head.bias] if head_trained else [hidden]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    logp = torch.log_softmax(head(hidden), -1)[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    owner = seq_index[:, :-1]
    totals = torch.zeros(3, dtype=torch.float64).index_add(0, owner[keep], picked[keep])
    (totals * weights).sum().backward()
    torch.testing.assert_close(ours.total.double(), totals, rtol=1e-5, atol=1e-5)
    assert ours.tokens.tolist() == torch.bincount(owner[keep], minlength=3).tolist()
    for a, b in zip(got, [p.grad for p in params], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _pref_cfg(model: str, objective: dict, method: str = "lora", data=PAIRS, **train) -> dict:
    cfg = tiny_train_cfg(model, method, **train)
    cfg["train_dataset"] = dict(
        data_files=str(data), tokenizer=model, template="chatml", max_length=64
    )
    cfg["objective"] = objective
    return cfg


@pytest.mark.integration
@pytest.mark.parametrize(
    "objective,method",
    [
        (dict(type="dpo", beta=0.5), "lora"),
        (dict(type="dpo", beta=0.5), "full"),
        (dict(type="dpo", beta=0.5, precompute_reference=True), "qlora"),
        (dict(type="orpo", beta=0.5), "lora"),
        (dict(type="simpo", beta=2.0, gamma=0.5), "lora"),
        (dict(type="kto", beta=0.5), "lora"),
    ],
    ids=["dpo_lora", "dpo_full", "dpo_qlora_cached", "orpo", "simpo", "kto"],
)
def test_training_raises_preference_accuracy(tiny_llama, tmp_path, objective, method):
    """A few steps over the same tiny data: the loss goes down and the logged metrics exist."""
    data = UNPAIRED if objective["type"] == "kto" else PAIRS
    cfg = _pref_cfg(
        tiny_llama,
        objective,
        method,
        data,
        max_iters=8,
        batch_size=4,
        lr=2e-3 if method == "lora" else 2e-4,
    )
    out = train(cfg, work_dir=tmp_path / "run")
    records = log_records(tmp_path / "run")
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert "rewards/chosen" in records[-1] and "rewards/rejected" in records[-1]
    meta = json.loads((out / "xtuner_lite.json").read_text())
    assert meta["objective"]["type"] == objective["type"]
    if method == "lora" and objective["type"] == "dpo":  # the eval task scores what was learnt
        result = _pair_eval(str(out))
        assert result.metrics["acc"] >= 0.75 and result.metrics["margin"] > 0
        assert result.samples[0]["scored_by"] == "implicit reward vs the adapter-disabled base"


def _pair_eval(model: str):
    task = dict(name="pairs", kind="preference", data=str(PAIRS), max_length=64)
    return run_eval([model], [task], show=False)[model]["pairs"]


@pytest.mark.integration
def test_precomputed_reference_is_cached_and_reused(tiny_llama, tmp_path, capsys):
    cfg = _pref_cfg(tiny_llama, dict(type="dpo", beta=0.5, precompute_reference=True), max_iters=2)
    train(cfg, work_dir=tmp_path / "a")
    assert "computing reference log-probabilities once" in capsys.readouterr().out
    assert list(Path(os.environ["XTUNER_LITE_DATA_CACHE"]).glob("reference-*.safetensors"))
    train(cfg, work_dir=tmp_path / "b")
    assert "computing reference" not in capsys.readouterr().out
    first = loss_curve(tmp_path / "a")
    assert first == loss_curve(tmp_path / "b") and abs(first[0] - math.log(2)) < 1e-4


def test_objective_and_data_kind_must_agree(tiny_llama, tmp_path):
    cfg = _pref_cfg(tiny_llama, dict(type="kto"))
    cfg["train_dataset"]["kind"] = "pairs"
    with pytest.raises(XtunerError, match="objective 'kto' trains on 'unpaired'"):
        train(cfg, work_dir=tmp_path / "run")
    cfg = _pref_cfg(tiny_llama, dict(type="dpo", betta=0.1))
    with pytest.raises(XtunerError, match="unknown key 'betta'; did you mean 'beta'"):
        train(cfg, work_dir=tmp_path / "run")


@pytest.mark.integration
def test_reward_model_trains_merges_and_scores_as_in_training(tiny_llama, tmp_path):
    """A reward model's loss goes down; merged, it is a transformers sequence-classification
    folder whose scores equal the scores our training code gives the same sequences."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from xtuner_lite.adapters import load_adapted
    from xtuner_lite.commands.merge import merge_adapter
    from xtuner_lite.model.logprobs import sequence_scores
    from xtuner_lite.objectives.preference.objective import score_head

    cfg = _pref_cfg(tiny_llama, dict(type="reward"), max_iters=8, batch_size=4, lr=2e-3)
    adapter = train(cfg, work_dir=tmp_path / "run")
    losses = loss_curve(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert json.loads((adapter / "xtuner_lite.json").read_text())["head"] == "reward"

    out = merge_adapter(None, adapter, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    peft_model, tokenizer, _ = load_adapted(None, adapter)
    dataset = _dataset(tokenizer, max_length=64)
    batch = collate_preference([dataset[0], dataset[1]], 2, 32)
    with torch.no_grad():
        ours = sequence_scores(peft_model, score_head(peft_model), batch)
        flat, owner = batch["input_ids"].reshape(-1), batch["seq_index"].reshape(-1)
        theirs = [
            float(merged(input_ids=flat[owner == i][None]).logits[0, 0])
            for i in range(int(batch["num_sequences"]))
        ]
    assert len(set(theirs)) > 1
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-4, atol=1e-4)
    result = _pair_eval(str(out))
    assert result.samples[0]["scored_by"] == "reward model score"
    assert result.metrics["acc"] >= 0.75

    # --reward-model: generations of a model scored as transformers scores the chat text
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in ("Hi?", "Why?"))
    )
    task = dict(name="gen", kind="generate", data=str(questions), max_new_tokens=6)
    gen = run_eval([tiny_llama], [task], show=False, reward_model=str(out))[tiny_llama]["gen"]
    tok = AutoTokenizer.from_pretrained(out)
    for sample, question in zip(gen.samples, ("Hi?", "Why?")):
        conv = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": sample["output"]},
        ]
        ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
        with torch.no_grad():
            expected = float(merged(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0])
        assert abs(sample["reward"] - expected) < 1e-4
    assert gen.metrics["reward"] == pytest.approx(sum(s["reward"] for s in gen.samples) / 2)


def test_check_dataset_shows_pairs_and_pair_statistics(smol_tokenizer):
    from rich.console import Console

    from xtuner_lite.commands.check_dataset import check_preference_dataset

    console = Console(record=True, width=120)
    cfg = dict(data_files=str(PAIRS), tokenizer=smol_tokenizer, template="chatml", max_length=64)
    stats = check_preference_dataset(cfg, num_samples=2, console=console)
    text = console.export_text()
    assert text.count("— chosen:") == 2 and text.count("— rejected:") == 2
    assert "⟦" in text  # trained spans marked off a terminal
    assert "pairs whose chosen response is longer" in text and stats.units == 12


def test_a_broken_reference_cache_is_named_not_blamed_on_the_learning_rate(tmp_path):
    """A truncated cache raised safetensors' error without the file; a NaN in it surfaced later
    as a NaN loss with the advice to lower the learning rate."""
    path = tmp_path / "reference-x.safetensors"
    assert cached_reference(path, 3) is None
    save_reference(path, torch.tensor([-1.0, -2.0, -3.0]))
    assert cached_reference(path, 3).tolist() == [-1.0, -2.0, -3.0]
    with pytest.raises(XtunerError, match=r"holds \(3,\) values for 4 sequences.*delete it"):
        cached_reference(path, 4)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(XtunerError, match=rf"{path.name} cannot be read .*delete it to compute"):
        cached_reference(path, 3)
    save_reference(path, torch.tensor([-1.0, float("nan"), float("-inf")]))
    with pytest.raises(XtunerError, match=r"2 of 3 sequence log-probabilities are not finite "
                                          r"\(first: sequence 1"):  # fmt: skip
        cached_reference(path, 3)
