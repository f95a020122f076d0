"""A bundled cloze task as an lm-evaluation-harness local-file task, to cross-check our scores."""

from __future__ import annotations

import json
import re
from pathlib import Path

from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.tasks import TaskSpec


def to_lm_eval_yaml(spec: TaskSpec, data_file: str | Path, name: str | None = None) -> str:
    """lm-eval's ``multiple_choice`` task for a 0-shot cloze spec over a JSONL file (its default
    target delimiter " " is our continuation " {choice}")."""
    if (
        (spec.kind, spec.style, spec.continuation) != ("mcq", "cloze", " {choice}")
        or spec.num_fewshot
        or spec.description
        or spec.chat
        or not isinstance(spec.choices, str)
    ):
        raise XtunerError(
            f"task {spec.name!r}: only 0-shot cloze tasks with a list field of "
            "choices map to lm-eval's multiple_choice"
        )
    jinja = re.sub(r"\{(\w+)\}", r"{{\1}}", spec.prompt)
    return "\n".join(
        [
            f"task: {name or spec.name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "test_split: test",
            "output_type: multiple_choice",
            f"doc_to_text: {json.dumps(jinja)}",
            f"doc_to_choice: {json.dumps('{{' + spec.choices + '}}')}",
            f"doc_to_target: {json.dumps('{{' + spec.answer + '}}')}",
            "metric_list:",
            "  - metric: acc",
            "  - metric: acc_norm",
            "",
        ]
    )
