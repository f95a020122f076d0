"""The evaluator: agreement with lm-evaluation-harness, circular MCQ, extraction, perplexity,
contamination, and errors that name the file, line and column."""

import json
import math

import pytest
import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation import LoadedModel, LoglikScorer, TaskSpec, evaluate_model
from xtuner_lite.evaluation.evaluator import evaluate_mcq, extract_answer, normalize_number
from xtuner_lite.evaluation.lm_eval_task import to_lm_eval_yaml
from xtuner_lite.evaluation.tasks import Row, load_rows

from conftest import EXAMPLE_DATA, shared_file

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    from xtuner_lite.evaluation import load_for_eval

    return load_for_eval(MODEL)


def _reference_logprob(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(context_ids) - 1 + j, t]) for j, t in enumerate(continuation_ids))


@pytest.mark.parametrize("chunk_tokens,attention", [(256, "sdpa"), (3, "sdpa"), (256, "eager")])
def test_shared_prefix_scores_equal_whole_sequence_scores(
    smol, chunk_tokens, attention, monkeypatch
):
    # several context batches; options packed into one row, or split across many; the packed
    # rows' block mask is boolean for SDPA and additive for eager attention
    monkeypatch.setattr(smol.model.config, "_attn_implementation", attention)
    scorer = LoglikScorer(smol.model, smol.tokenizer, batch_tokens=300, chunk_tokens=chunk_tokens)
    pairs = [
        ("Question: What colour is the sky?\nAnswer:", " blue"),
        ("Question: What colour is the sky?\nAnswer:", " green on Tuesdays and purple"),
        ("The capital of France is ", "Paris"),
        ("Hi", " there, friend"),
        ("", "Hello world"),
        ("A much longer context " * 12, " end"),
    ]
    for (context, continuation), score in zip(pairs, scorer.score(pairs)):
        c, x = scorer.encode_pair(context, continuation)
        assert score.num_tokens == len(x)
        assert score.logprob == pytest.approx(_reference_logprob(smol.model, c, x), abs=1e-3)


def test_mcq_accuracy_agrees_with_lm_evaluation_harness(smol, tmp_path):
    """Same model, same 60 ARC-Easy questions, same prompt format: same per-question choice."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    lines = shared_file("eval/llmfoundry_arc_easy.jsonl").read_text().splitlines()[:60]
    data = tmp_path / "arc60.jsonl"
    data.write_text("\n".join(lines) + "\n")
    spec = TaskSpec(name="arc", data=str(data), prompt="{query}\nAnswer:", answer="gold")
    (tmp_path / "arc_local.yaml").write_text(to_lm_eval_yaml(spec, data, "arc_local"))
    from xtuner_lite.hub import resolve_model_path

    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={resolve_model_path(MODEL)},dtype=float32",
        tasks=["arc_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=16,
        device="cpu",
        log_samples=True,
    )
    theirs = reference["results"]["arc_local"]
    ours = evaluate_model(smol, [spec])["arc"]
    assert abs(ours.metrics["acc"] - theirs["acc,none"]) <= 0.005
    assert abs(ours.metrics["acc_norm"] - theirs["acc_norm,none"]) <= 0.005
    samples = sorted(reference["samples"]["arc_local"], key=lambda s: s["doc_id"])
    for sample, mine in zip(samples, ours.samples):
        lls = [r[0] for r in sample["filtered_resps"]]
        assert mine["logprobs"] == pytest.approx(lls, abs=2e-3)


class _FakeScorer:
    """Scores the lettered option whose text is ``answers[question]`` (or always "A")."""

    def __init__(self, answers=None):
        self.answers = answers

    def score(self, pairs):
        from xtuner_lite.evaluation.loglik import Score

        out = []
        for context, continuation in pairs:
            letter = continuation.strip()
            if self.answers is None:
                good = letter == "A"
            else:
                question = context.split("\n")[0]
                options = dict(line.split(". ", 1) for line in context.split("\n")[1:-1])
                good = options[letter] == self.answers[question]
            out.append(Score(0.0 if good else -1.0, good, 1))
        return out


def _letter_rows():
    rows = [
        ("Q1", ["a", "b", "c", "d"], 0),
        ("Q2", ["a", "b", "c", "d"], 2),
        ("Q3", ["w", "x", "y", "z"], 3),
        ("Q4", ["p", "q", "r", "s"], 0),
    ]
    return [
        Row({"question": q, "choices": c, "answer": g}, f"mem:{i}")
        for i, (q, c, g) in enumerate(rows)
    ]


def test_circular_evaluation_rotates_options():
    spec = TaskSpec(name="toy", data="-", style="letter", prompt="{question}\n{options}\nAnswer:")
    rows = _letter_rows()
    model = LoadedModel("fake", None, None)
    always_a = evaluate_mcq(spec, rows, model, None, _FakeScorer())
    assert always_a.metrics["acc"] == 0.5  # two golds are "A" ...
    assert always_a.metrics["circular_acc"] == 0.0  # ... but no rotation survives
    oracle = {r.fields["question"]: r.fields["choices"][r.fields["answer"]] for r in rows}
    knows = evaluate_mcq(spec, rows, model, None, _FakeScorer(oracle))
    assert knows.metrics == {"acc": 1.0, "circular_acc": 1.0}
    assert all(s["circular_correct"] for s in knows.samples)


@pytest.mark.parametrize(
    "text, how, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 1,234", "last_number", "1234"),
        ("The answer is $15.00.", "last_number", "15"),
        ("no digits here", "last_number", None),
        ("The answer is (B).", "letter", "B"),
        ("C. Paris is the capital", "letter", "C"),
        ("I think it's d", "letter", "D"),
        ("Answer: 42 apples", "regex:Answer: (\\d+)", "42"),
    ],
)
def test_answer_extraction(text, how, expected):
    assert extract_answer(text, how) == expected


def test_gsm8k_generation_scores_extracted_numbers(smol, monkeypatch):
    """Two GSM8K questions, greedy; the score is recomputed from the saved outputs."""
    from xtuner_lite.evaluation.run import resolve_task

    data = shared_file("eval/gsm8k_test.jsonl")
    spec = resolve_task("gsm8k")
    spec.data, spec.fewshot_data = str(data), str(data.with_name("gsm8k_train.jsonl"))
    spec.max_new_tokens, spec.num_fewshot = 48, 2
    result = evaluate_model(smol, [spec], limit=2)["gsm8k"]
    assert result.n == 2
    for sample in result.samples:
        assert "Question:" not in sample["output"]  # stopped at the next question
        assert sample["extracted"] == extract_answer(sample["output"], "last_number")
        assert sample["correct"] == (sample["extracted"] == normalize_number(sample["reference"]))


def test_perplexity_equals_direct_computation(smol, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    spec = TaskSpec(name="ppl", kind="perplexity", data=str(tmp_path / "t.jsonl"), window=16)
    result = evaluate_model(smol, [spec])["ppl"]
    scorer = LoglikScorer(smol.model, smol.tokenizer)
    ids = scorer.encode(text)
    nll = 0.0
    for start in range(0, len(ids), 16):  # each window predicted from the token before it
        context = ids[start - 1 : start] if start else scorer.empty_context
        nll -= _reference_logprob(smol.model, context, ids[start : start + 16])
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    assert result.metrics["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode()), rel=1e-4
    )


def test_bad_task_files_name_file_line_and_column(tmp_path):
    from xtuner_lite.evaluation.run import resolve_task

    bad_csv = tmp_path / "quiz_test.csv"
    bad_csv.write_text("question,choice0,choice1,answer\nWhat?,a,b,0\nShort row,a\n")
    spec = TaskSpec(
        name="quiz",
        data=str(bad_csv),
        style="letter",
        choices=["choice0", "choice1"],
        prompt="{question}\n{options}\nAnswer:",
    )
    with pytest.raises(XtunerError, match=r"quiz_test.csv:3: no value for column 'choice1'"):
        load_rows(spec, None)
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"query": "Q?", "choices": ["a", "b"]}\n')
    spec = TaskSpec(name="m", data=str(missing), prompt="{query}", answer="gold")
    rows = load_rows(spec, None)
    with pytest.raises(XtunerError, match=r"m.jsonl:1: missing field 'gold'"):
        evaluate_mcq(spec, rows, LoadedModel("fake", None, None), None, _FakeScorer())
    broken = tmp_path / "task.json"
    broken.write_text('{"name": "x",\n "data": "y.jsonl",\n "prompt": }')
    with pytest.raises(XtunerError, match=r"task.json: invalid JSON at line 3 column"):
        resolve_task(str(broken))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"name": "x", "data": "y.jsonl", "promt": "{q}"}))
    with pytest.raises(XtunerError, match="unknown key 'promt' \\(did you mean 'prompt'\\?\\)"):
        resolve_task(str(typo))
    with pytest.raises(XtunerError, match="did you mean 'mmlu'"):
        resolve_task("mmlu_")


def test_contamination_finds_copied_questions(tmp_path, capsys):
    from xtuner_lite.evaluation.contamination import report_contamination

    eval_file = tmp_path / "qa.jsonl"
    questions = [
        f"Question number {i}: how many marbles does a child with {i} bags of seven "
        "marbles each have in total?"
        for i in range(5)
    ] + ["Too short to check."]
    eval_file.write_text(
        "".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in questions)
    )
    train = tmp_path / "train.json"
    train.write_text(
        json.dumps(
            [
                {"instruction": "Say hi", "output": "hi"},
                {"instruction": questions[3], "output": "21"},
            ]
        )
    )
    task = {"name": "qa", "kind": "generate", "data": str(eval_file)}
    flagged = report_contamination([str(train)], task, ngram=8, threshold=0.5)
    assert [o.source for o in flagged] == [f"{eval_file}:4"]
    assert flagged[0].share == 1.0 and flagged[0].train_source == f"{train}[1]"
    # the shared wording ("bags of seven marbles each have in total") is a partial overlap
    partial = report_contamination([str(train)], task, ngram=8)
    assert len(partial) == 5 and all(o.share < 0.5 for o in partial[1:])
    assert "1 samples have fewer than 8 words and were not checked" in capsys.readouterr().out


def _toy_mcq(folder):
    """A small MCQ file the model can learn: capitals, lettered, with their task spec."""
    facts = [
        ("France", "Paris"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Japan", "Tokyo"),
        ("Egypt", "Cairo"),
        ("Peru", "Lima"),
    ]
    cities = [c for _, c in facts]
    rows = []
    for i, (country, city) in enumerate(facts):
        options = [city] + [c for c in cities if c != city][:3]
        options = options[i % 4 :] + options[: i % 4]
        rows.append(
            {
                "question": f"What is the capital of {country}?",
                "choices": options,
                "answer": options.index(city),
            }
        )
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = folder / "capitals.json"
    spec.write_text(
        json.dumps(
            {"name": "capitals", "data": str(data), "prompt": "Question: {question}\nAnswer:"}
        )
    )
    return spec


def test_eval_cli_compares_models_side_by_side(tiny_llama, tmp_path, capsys):
    from test_merge import _make_adapter

    from xtuner_lite.cli import main

    spec = _toy_mcq(tmp_path)
    adapter = _make_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "results.json"
    assert (
        main(
            [
                "eval",
                "--models",
                tiny_llama,
                str(adapter),
                "--tasks",
                str(spec),
                "--out",
                str(out),
                "--num-fewshot",
                "2",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "capitals" in table and "Δ adapter" in table
    saved = json.loads(out.read_text())
    assert saved["config"]["tasks"][0]["num_fewshot"] == 2
    results = saved["results"]
    before, after = results[tiny_llama]["capitals"], results[str(adapter)]["capitals"]
    assert before["n"] == after["n"] == 6 and len(after["samples"]) == 6
    assert before["samples"][0]["logprobs"] != after["samples"][0]["logprobs"]  # adapter used
    assert main(["eval", "--models", tiny_llama, "--tasks", "arc_eazy"]) == 1
    assert "did you mean 'arc_easy'" in capsys.readouterr().err


def test_training_hook_scores_tasks_before_during_and_after(tiny_llama, tmp_path):
    from xtuner_lite.commands.train import train

    spec = _toy_mcq(tmp_path)
    cfg = dict(
        model=dict(pretrained=tiny_llama, lora=dict(r=8, alpha=16, dropout=0.0)),
        train_dataset=dict(
            data_files=str(EXAMPLE_DATA / "alpaca_mini.json"),
            tokenizer=tiny_llama,
            template="smollm2",
            max_length=96,
        ),
        train=dict(
            max_iters=4,
            lr=1e-2,
            dtype=None,
            save_steps=100,
            eval_tasks=[str(spec)],
            eval_freq=2,
            eval_limit=None,
        ),
    )
    train(cfg, work_dir=tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work/eval.jsonl").read_text().splitlines()]
    assert [r["when"] for r in records] == ["before training", "step 2", "after training"]
    assert all(r["capitals"]["n"] == 6 and 0 <= r["capitals"]["acc"] <= 1 for r in records)


def test_generation_scoring_extracts_the_written_letter(monkeypatch):
    from xtuner_lite.evaluation import evaluator

    rows = _letter_rows()
    oracle = {r.fields["question"]: r.fields["choices"][r.fields["answer"]] for r in rows}

    def answer(spec, model, prompts, max_batch_size=32, images=None):
        replies = []
        for prompt in prompts:
            lines = prompt.split("\n")
            options = dict(line.split(". ", 1) for line in lines[1:-1])
            letter = next(k for k, v in options.items() if v == oracle[lines[0]])
            replies.append(f"I think the answer is ({letter}) because it fits.")
        return replies

    spec = TaskSpec(
        name="toy",
        data="-",
        style="letter",
        scoring="generate",
        prompt="{question}\n{options}\nAnswer:",
    )
    monkeypatch.setattr(evaluator, "_generate", answer)
    right = evaluate_mcq(spec, rows, LoadedModel("fake", None, None), None, scorer=None)
    assert right.metrics == {"acc": 1.0, "circular_acc": 1.0}
    assert right.samples[0]["output"].startswith("I think")
    monkeypatch.setattr(
        evaluator, "_generate", lambda s, m, p, b=32, images=None: ["no idea"] * len(p)
    )
    lost = evaluate_mcq(spec, rows, LoadedModel("fake", None, None), None, scorer=None)
    assert lost.metrics["acc"] == 0.0 and {s["pred"] for s in lost.samples} == {-1}
    with pytest.raises(XtunerError, match="scoring must be 'loglik', or 'generate' with style"):
        TaskSpec(name="bad", data="-", scoring="generate")


def test_example_task_files_load_their_data_from_beside_them():
    from xtuner_lite.evaluation.run import resolve_task

    from conftest import ROOT

    for name in ("capitals.json", "capitals_letter.json"):
        spec = resolve_task(str(ROOT / "xtuner_lite/examples/tasks" / name))
        rows = load_rows(spec, data_root=None)
        assert len(rows) == 12 and spec.data.endswith("examples/tasks/capitals.jsonl")
