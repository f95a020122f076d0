"""GRPO: advantages and each loss aggregation against hand-computed values and TRL's loss on the
same log-probabilities; clipping; the KL term; the reward functions and their errors; rollouts
and whole runs on a tiny model (the old-log-prob path with num_iterations > 1, exact resume)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from grpo_reference import trl_grpo_loss
from safetensors.torch import load_file
from trl.trainer.utils import nanstd

from xtuner_lite.commands.train import train
from xtuner_lite.errors import XtunerError
from xtuner_lite.objectives import build_objective
from xtuner_lite.objectives.grpo.arithmetic import write_splits
from xtuner_lite.objectives.grpo.losses import group_advantages, grpo_loss
from xtuner_lite.objectives.grpo.prompts import process_prompt_dataset
from xtuner_lite.objectives.grpo.rewards import (
    RewardError,
    build_rewards,
    code_tests,
    extract_answer,
    format_match,
    length_penalty,
    numeric_answer,
    score,
)
from xtuner_lite.training import runner as runner_module

from conftest import log_records, loss_curve, tiny_train_cfg

# advantages -----------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, equal = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert adv[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]])
    assert adv[4:].tolist() == [0.0] * 4
    assert equal.tolist() == [False, True]
    centred, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: not scaled
    assert centred.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_equal_trl_formula(scale):
    """TRL: (r - group mean) / (nanstd over the group or the batch + 1e-4)."""
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 3)
    mean = grouped.mean(1).repeat_interleave(3)
    std = nanstd(grouped, dim=1).repeat_interleave(3) if scale == "group" else nanstd(rewards)
    ours, _ = group_advantages(rewards, 3, scale)
    assert torch.allclose(ours, (rewards - mean) / (std + 1e-4), atol=1e-6)


# the loss -------------------------------------------------------------------------------------


def _case(seed: int, sequences: int = 5, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (sequences,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logps = -torch.rand(sequences, width, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(sequences, width, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref = logps + (torch.rand(sequences, width, generator=g, dtype=torch.float64) - 0.5)
    advantages = torch.randn(sequences, generator=g, dtype=torch.float64)
    return logps, old, ref, advantages, mask


def _flat(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return padded[mask]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_loss_and_gradient_equal_trl(aggregation, beta, epsilon_high):
    """Old log-probs differ from the policy's (the num_iterations > 1 path), so clipping bites."""
    logps, old, ref, advantages, mask = _case(1)
    owner = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    ours_in = _flat(logps, mask).clone().requires_grad_(True)
    result = grpo_loss(
        ours_in, _flat(old, mask), advantages, owner, mask.shape[0], 0.2, epsilon_high,
        aggregation, 7, beta, _flat(ref, mask),
    )  # fmt: skip
    ours = result.total / result.units
    theirs_in = logps.clone().requires_grad_(True)
    theirs = trl_grpo_loss(
        theirs_in, old, ref if beta else None, advantages, mask, aggregation, 0.2,
        epsilon_high or 0.2, beta, 7,
    )  # fmt: skip
    assert float(ours.detach()) == pytest.approx(float(theirs), rel=1e-10, abs=1e-12)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad[mask], atol=1e-12)
    assert result.clipped_low.sum() + result.clipped_high.sum() > 0  # the case does clip


def test_clipping_and_kl_by_hand():
    logps = torch.log(torch.tensor([0.6, 0.2, 0.5]))
    old = torch.log(torch.tensor([0.4, 0.4, 0.5]))  # ratios 1.5, 0.5, 1.0
    advantages = torch.tensor([1.0, -1.0, 2.0])
    owner = torch.tensor([0, 1, 2])
    result = grpo_loss(logps, old, advantages, owner, 3, epsilon=0.2, aggregation="dapo")
    # -min(1.5*1, 1.2*1) = -1.2 ; -min(0.5*-1, 0.8*-1) = 0.8 ; -min(1*2, 1*2) = -2
    assert float(result.total) == pytest.approx(-1.2 + 0.8 - 2.0)
    assert result.clipped_high.tolist() == [1.0, 0.0, 0.0]
    assert result.clipped_low.tolist() == [0.0, 1.0, 0.0]
    ref = torch.log(torch.tensor([0.3, 0.2, 0.25]))
    with_kl = grpo_loss(logps, old, advantages, owner, 3, aggregation="dapo", beta=0.1,
                        ref_logps=ref)  # fmt: skip
    r = torch.tensor([0.3 / 0.6, 1.0, 0.5])  # pi_ref / pi
    assert with_kl.kl.tolist() == pytest.approx((r - torch.log(r) - 1).tolist(), rel=1e-6)
    expected = 0.1 * float(with_kl.kl.sum())
    assert float(with_kl.total - result.total) == pytest.approx(expected, rel=1e-5)


def test_zero_weight_sequences_add_nothing():
    logps, old, _, advantages, mask = _case(2, sequences=4)
    owner = torch.arange(4)[:, None].expand_as(mask)[mask]
    full = grpo_loss(_flat(logps, mask), _flat(old, mask), advantages, owner, 4)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0])
    part = grpo_loss(_flat(logps, mask), _flat(old, mask), advantages, owner, 4, weights=weights)
    keep = torch.tensor([0, 2])
    keep_mask = mask[keep]
    owner2 = torch.arange(2)[:, None].expand_as(keep_mask)[keep_mask]
    only = grpo_loss(logps[keep][keep_mask], old[keep][keep_mask], advantages[keep], owner2, 2)
    assert part.units == 2 and float(part.total) == pytest.approx(float(only.total))
    assert float(full.total) != pytest.approx(float(part.total))


# rewards --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 12 + 30 = 42\n#### 42", 42),
        ("#### 1,234 apples, not 7", 1234),
        ("the result is \\boxed{3/4}, see 5", 0.75),
        ("first 3 then 4.5", 4.5),
        ("no number here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_built_in_rewards():
    row = {"answer": "Natalia sold 48 clips... #### 72"}
    assert numeric_answer()(row, "so she sold 72") == 1.0
    assert numeric_answer()(row, "#### 71") == 0.0
    assert format_match(r"####\s*\d+\s*$")(row, "x\n#### 72") == 1.0
    assert format_match(r"####\s*\d+\s*$")(row, "#### 72 apples") == 0.0
    assert length_penalty(10)(row, "x" * 10) == 0.0
    assert length_penalty(10)(row, "x" * 15) == pytest.approx(-0.5)
    assert length_penalty(10)(row, "x" * 100) == -1.0


def test_code_reward_runs_tests_in_a_sandbox():
    reward = code_tests(timeout=3.0)
    row = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
    assert reward(row, "```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert reward(row, "def add(a, b):\n    return 3") == 0.5
    network = "import socket\nsocket.create_connection(('127.0.0.1', 22), 1)\n"
    assert reward(row, network + "def add(a, b):\n    return a + b") == 0.0
    assert reward(row, "while True:\n    pass") == 0.0  # stopped at the time limit
    assert reward(row, "x = bytearray(8 << 30)\ndef add(a, b):\n    return a + b") == 0.0


def bad_reward(row: dict, completion: str) -> float:
    return {}["missing"]


def test_reward_configuration_problems_are_collected():
    with pytest.raises(XtunerError) as err:
        build_rewards([dict(type="numeric"), dict(type="format", weight="high"), "no.such.fn"])
    text = str(err.value)
    assert "objective.rewards[0]: unknown reward 'numeric'" in text
    assert "objective.rewards[1].weight: expected a number" in text
    assert "objective.rewards[2]: cannot import reward function 'no.such.fn'" in text


def test_a_failing_reward_names_itself_and_the_row():
    rewards = build_rewards([numeric_answer(), bad_reward])
    with pytest.raises(
        RewardError, match=r"reward 'bad_reward' raised KeyError.*data.jsonl, line 3"
    ):
        score(rewards, {"answer": "1"}, "1", "data.jsonl, line 3")
    with pytest.raises(RewardError, match="returned None"):
        score(build_rewards([lambda row, c: None]), {}, "x", "data.jsonl, line 1")
    with pytest.raises(RewardError, match=r"returned nan \(float\), not a finite"):
        score(build_rewards([lambda row, c: float("nan")]), {}, "x", "data.jsonl, line 1")


def leaves(row: dict, completion: str) -> float:
    sys.exit(0)


def test_numpy_rewards_count_and_sys_exit_is_an_error_not_an_end():
    """A reward returning a numpy scalar is a number; one calling sys.exit() stops the run with
    an error naming it and the row (it ended training with rc 0 and no adapter)."""
    rewards = build_rewards(
        [dict(fn=lambda row, c: np.float32(0.5), name="a"), dict(fn=lambda row, c: np.int64(2))]
    )
    assert score(rewards, {}, "x", "data.jsonl, line 1") == [0.5, 2.0]
    with pytest.raises(RewardError, match=r"reward 'leaves' raised SystemExit: 0 .*line 4"):
        score(build_rewards([leaves]), {}, "x", "data.jsonl, line 4")
    with pytest.raises(RewardError, match="not a finite number"):
        score(build_rewards([lambda row, c: np.array([1.0, 2.0])]), {}, "x", "data.jsonl, line 1")


# data and whole runs on a tiny model ----------------------------------------------------------


@pytest.fixture
def arithmetic(tmp_path):
    write_splits(tmp_path, train=16, test=4)
    return tmp_path / "arithmetic_train.jsonl"


def test_prompts_render_the_question_and_keep_the_row(arithmetic, smol_tokenizer):
    prompts, stats = process_prompt_dataset(str(arithmetic), smol_tokenizer, "smollm2")
    assert stats.prompts == stats.rows == 16
    text = smol_tokenizer.decode(prompts[0].ids)
    assert text.endswith("<|im_start|>assistant\n") and prompts[0].row["question"] in text
    assert set(prompts[0].row) == {"question", "answer", "op"}  # the reward's fields kept
    limit = sorted(len(p.ids) for p in prompts)[8]
    short, stats = process_prompt_dataset(str(arithmetic), smol_tokenizer, "smollm2", "question",
                                          max_prompt_length=limit)  # fmt: skip
    assert sum(stats.skipped.values()) == 16 - len(short) > 0


def grpo_cfg(model: str, data, **objective) -> dict:
    return dict(
        model=dict(pretrained=model, method="lora", lora=dict(r=4, alpha=8, dropout=0.0)),
        train_dataset=dict(
            data_files=str(data), tokenizer=model, template="smollm2", map_fn="question"
        ),  # fmt: skip
        objective=dict(
            type="grpo",
            rewards=[dict(type="numeric_answer"), dict(type="length_penalty", max_chars=60)],
            num_generations=3,
            max_new_tokens=12,
            **objective,
        ),  # fmt: skip
        train=tiny_train_cfg(model, batch_size=2, save_total_limit=3)["train"],
    )


@pytest.mark.integration
def test_grpo_run_logs_rollouts_and_resumes_exactly(tmp_path, tiny_llama, arithmetic):
    """num_iterations=2 (old log-probs kept) and beta > 0 (the adapter-disabled reference); a
    run resumed from the step-2 checkpoint samples the same completions and ends with the same
    adapter as the straight run."""
    cfg = grpo_cfg(str(tiny_llama), arithmetic, num_iterations=2, beta=0.05)
    straight = train(cfg, work_dir=tmp_path / "straight")
    records = log_records(tmp_path / "straight")
    assert len(records) == 4
    for key in ("reward", "reward/numeric_answer", "completion/length", "kl", "clip_ratio/low",
                "rollout/tokens_per_s", "train_tokens_per_s", "groups/all_equal"):  # fmt: skip
        assert key in records[-1], key
    assert records[-1]["kl"] > 0  # the adapter moved away from the reference
    samples = [json.loads(x) for x in (tmp_path / "straight" / "samples.jsonl").open()]
    assert {s["step"] for s in samples} == {0, 1, 2, 3} and "reward" in samples[0]

    resumed = train(cfg, work_dir=tmp_path / "resumed", resume=tmp_path / "straight/iter_2.pth")
    assert loss_curve(tmp_path / "resumed") == loss_curve(tmp_path / "straight")[2:]  # steps 3-4
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_bf16_rollouts_run_under_trainings_autocast(tmp_path, tiny_llama, arithmetic, monkeypatch):
    """A bf16 frozen base with fp32 adapters (the bundled configs on a bf16 CPU or a GPU): the
    rollouts and old log-probs run under the same autocast as the updates, so the adapter's
    fp32 layers never meet a bf16 input outside it."""
    monkeypatch.setattr(runner_module, "cpu_has_fast_bf16", lambda: True)
    cfg = grpo_cfg(str(tiny_llama), arithmetic, num_iterations=2)
    cfg["model"]["dtype"] = "bf16"
    cfg["train"].update(dtype="bf16", max_iters=2)
    train(cfg, work_dir=tmp_path / "run")
    records = log_records(tmp_path / "run")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.integration
def test_a_failing_reward_stops_the_run_cleanly(tmp_path, tiny_llama, arithmetic):
    cfg = grpo_cfg(str(tiny_llama), arithmetic)
    cfg["objective"]["rewards"] = [dict(fn=bad_reward)]
    with pytest.raises(XtunerError, match=r"reward 'bad_reward' raised KeyError.*line \d+"):
        train(cfg, work_dir=tmp_path / "run")


@pytest.mark.parametrize("attention", ["xtuner_packed_sdpa", "sdpa", "eager"])
def test_shared_prompt_batches_equal_a_row_per_completion(tiny_llama, smol_tokenizer, arithmetic,
                                                          attention):  # fmt: skip
    """Each prompt once with its completions as branches: the same per-token log-probs and
    gradients as a padded row per completion (fp32), a group cut by the micro-batch included."""
    from xtuner_lite.hub import load_model
    from xtuner_lite.model.attention import register_packed_sdpa
    from xtuner_lite.model.logprobs import token_logps
    from xtuner_lite.objectives.grpo.rollout import Completion, completion_batch

    register_packed_sdpa()
    llm = load_model(tiny_llama, dtype="float32", attn_implementation=attention)
    prompts, _ = process_prompt_dataset(str(arithmetic), smol_tokenizer, "smollm2")
    rng = torch.Generator().manual_seed(0)
    completions = [
        Completion(prompts[g], g, torch.randint(5, 1000, (n,), generator=rng).tolist(), "", False)
        for g, n in [(0, 7), (0, 3), (0, 11), (1, 5), (1, 9), (2, 4)]
    ]
    advantages, weights = torch.randn(6, generator=rng), torch.ones(6)

    def run(batch):
        llm.zero_grad()
        logps, owner = token_logps(llm, batch)
        (logps * torch.arange(1, logps.numel() + 1)).sum().backward()
        grads = [p.grad.clone() for p in llm.parameters() if p.grad is not None]
        return logps.detach(), owner, grads

    for part in (slice(0, 6), slice(1, 5)):
        args = (completions[part], advantages[part], weights[part], 2)
        shared = completion_batch(*args, share_prompts=True)
        assert shared["input_ids"].shape[0] == 1  # one row, each prompt once
        assert int(shared["num_tokens"]) < int(completion_batch(*args)["num_tokens"])
        ref, got = run(completion_batch(*args)), run(shared)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], ref[1])
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grpo_config_problems():
    with pytest.raises(XtunerError) as err:
        build_objective(dict(type="grpo", rewards=[numeric_answer()], num_generations=1,
                             aggregation="sum", temperature=0))  # fmt: skip
    text = str(err.value)
    assert "num_generations must be >= 2" in text and "aggregation must be one of" in text
    assert "temperature must be > 0" in text


@pytest.mark.parametrize("equal_groups", ["keep", "skip"])
def test_groups_with_equal_rewards_are_counted_and_kept_or_skipped(
    tmp_path, tiny_llama, arithmetic, smol_tokenizer, equal_groups
):
    from xtuner_lite.data.templates import get_template
    from xtuner_lite.hub import load_model

    prompts, _ = process_prompt_dataset(str(arithmetic), smol_tokenizer, "smollm2")
    first = prompts[0].row["question"]

    def first_fixed(row: dict, completion: str) -> float:
        """All of the first prompt's completions get 1 (equal rewards); the others vary."""
        return 1.0 if row["question"] == first else float(len(completion))

    objective = build_objective(dict(type="grpo", rewards=[first_fixed],
                                     num_generations=3, max_new_tokens=8,
                                     equal_groups=equal_groups))  # fmt: skip
    objective.bind(smol_tokenizer, get_template("smollm2"), seed=0, rank=0, work_dir=None)
    llm = load_model(tiny_llama, dtype="float32")
    batches = objective.prepare(llm, [{"prompts": prompts[:2], "indices": [0, 1]}], step=0)
    (batch,) = batches
    assert batch["advantages"][:3].tolist() == [0.0, 0.0, 0.0]
    expected = [0.0] * 3 + [1.0] * 3 if equal_groups == "skip" else [1.0] * 6
    assert batch["weights"].tolist() == expected
    assert objective.units(batch) == sum(expected)
    assert objective.take_metrics()["groups/all_equal"] == (1.0, 2)
