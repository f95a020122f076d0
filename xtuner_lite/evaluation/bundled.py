"""Bundled task specs for the public sets in ``../shared/data/eval`` (paths relative to it).

Prompts follow lm-evaluation-harness's formats for the same sets, so scores are comparable.
"""

from __future__ import annotations

from typing import Any

from xtuner_lite.evaluation.tasks import TaskSpec

MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
LETTER_PROMPT = "{question}\n{options}\nAnswer:"

BUILTIN_TASKS: dict[str, dict[str, Any]] = {
    "arc_easy": dict(data="llmfoundry_arc_easy.jsonl", prompt="{query}\nAnswer:", answer="gold"),
    "arc_challenge": dict(
        data="llmfoundry_arc_challenge.jsonl", prompt="{query}\nAnswer:", answer="gold"
    ),
    "piqa": dict(data="llmfoundry_piqa.jsonl", prompt="{query}\nAnswer:", answer="gold"),
    "openbookqa": dict(data="llmfoundry_openbook_qa.jsonl", prompt="{query}", answer="gold"),
    "boolq": dict(data="llmfoundry_boolq.jsonl", prompt="{query}\nAnswer:", answer="gold"),
    "winogrande": dict(
        data="llmfoundry_winogrande.jsonl",
        style="partial",
        choices="context_options",
        prompt="{choice}",
        continuation=" {continuation}",
        answer="gold",
    ),
    "hellaswag": dict(
        data="hellaswag/hellaswag_val_from_klosax.jsonl",
        prompt="{query}",
        choices="endings",
        answer="label",
    ),
    # MMLU as lm-eval's `mmlu` (letters, 0-shot by default); circular evaluation on
    "mmlu": dict(
        data="mmlu/test/*.csv",
        fewshot_data="mmlu/dev/*.csv",
        style="letter",
        description=MMLU_DESCRIPTION,
        prompt=LETTER_PROMPT,
        choices=["choice0", "choice1", "choice2", "choice3"],
    ),
    # MMLU answered in writing through the chat template: the letter is extracted from the reply
    "mmlu_gen": dict(
        data="mmlu/test/*.csv",
        fewshot_data="mmlu/dev/*.csv",
        style="letter",
        scoring="generate",
        chat=True,
        max_new_tokens=24,
        description=MMLU_DESCRIPTION,
        prompt=LETTER_PROMPT.replace("Answer:", "Answer with the letter only."),
        choices=["choice0", "choice1", "choice2", "choice3"],
    ),
    # MMLU as a cloze task (SmolLM2's model card reports this one)
    "mmlu_cloze": dict(
        data="mmlu/test/*.csv",
        description=MMLU_DESCRIPTION,
        prompt="Question: {question}\nAnswer:",
        choices=["choice0", "choice1", "choice2", "choice3"],
    ),
    "cmmlu": dict(
        data="cmmlu/test/*.csv",
        fewshot_data="cmmlu/dev/*.csv",
        style="letter",
        description="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
        prompt="题目：{Question}\n{options}\n答案是：",
        choices=["A", "B", "C", "D"],
        answer="Answer",
    ),
    "gsm8k": dict(
        kind="generate",
        data="gsm8k_test.jsonl",
        fewshot_data="gsm8k_train.jsonl",
        num_fewshot=5,
        prompt="Question: {question}\nAnswer:",
        fewshot_target=" {answer}",
        target="answer",
        target_regex=r"####\s*(.+)$",
        extract="last_number",
        stop=["Question:", "</s>", "<|im_end|>", "\n\n"],
        max_new_tokens=256,
    ),
}


def builtin_task(name: str) -> TaskSpec | None:
    spec = BUILTIN_TASKS.get(name)
    if spec is None:
        return None
    return TaskSpec(name=name, **spec)
