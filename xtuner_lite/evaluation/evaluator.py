"""Run tasks on a model: multiple choice (log-likelihood, circular), generation, perplexity,
preference pairs.

``evaluate_model`` returns, per task, the scores and every sample's prediction, so a results file
can be audited question by question.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xtuner_lite.data.dataset import collate_preference
from xtuner_lite.data.images import placed_before
from xtuner_lite.data.preference import PreferenceData, preference_units
from xtuner_lite.data.templates import stop_token_ids
from xtuner_lite.data.tokenize import tokenize_rendered
from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.loglik import LoglikScorer
from xtuner_lite.evaluation.tasks import (
    Row,
    TaskSpec,
    choices_of,
    field_of,
    gold_of,
    load_rows,
    render,
)
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.images import image_input_for
from xtuner_lite.inference.loader import LoadedModel  # what the evaluator scores
from xtuner_lite.model.build import model_head
from xtuner_lite.model.logprobs import sequence_logps, sequence_scores
from xtuner_lite.objectives.preference.objective import score_head
from xtuner_lite.objectives.reference import Reference

NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    n: int
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def interval(self, metric: str) -> float:
        """Half-width of the normal-approximation 95 % interval of an accuracy."""
        p = self.metrics[metric]
        return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / max(self.n, 1))


# ----------------------------------------------------------------------------- prompts
def _options(spec: TaskSpec, choices: list[str]) -> str:
    return "\n".join(f"{spec.letters[i]}. {c}" for i, c in enumerate(choices))


def _mcq_requests(spec: TaskSpec, row: Row, choices: list[str]) -> list[tuple[str, str]]:
    """(context, continuation) per option, without few-shot prefix."""
    if spec.style == "letter":
        context = render(spec.prompt, row, options=_options(spec, choices))
        return [(context, f" {spec.letters[i]}") for i in range(len(choices))]
    if spec.style == "partial":
        continuation = render(spec.continuation, row)
        return [(render(spec.prompt, row, choice=c), continuation) for c in choices]
    context = render(spec.prompt, row)
    return [(context, render(spec.continuation, row, choice=c)) for c in choices]


def _exemplar(spec: TaskSpec, row: Row) -> str:
    if spec.kind == "generate":
        target = spec.fewshot_target or (" {" + spec.target + "}")
        return render(spec.prompt, row) + render(target, row)
    choices = choices_of(spec, row)
    context, continuation = _mcq_requests(spec, row, choices)[gold_of(spec, row, len(choices))]
    return context + continuation


class PromptBuilder:
    """Few-shot prefix (per subject, from the dev rows) and optional chat wrapping."""

    def __init__(self, spec: TaskSpec, data_root, model: LoadedModel):
        self.spec = spec
        self.model = model
        self.shots: dict[str | None, list[Row]] = defaultdict(list)
        if spec.num_fewshot:
            for row in load_rows(spec, data_root, which="fewshot"):
                if len(self.shots[row.subject]) < spec.num_fewshot:
                    self.shots[row.subject].append(row)

    def prefix(self, row: Row) -> str:
        spec = self.spec
        head = render(spec.description, row) if spec.description else ""
        shots = [r for r in self.shots.get(row.subject, []) if r.source != row.source]
        return head + "".join(
            _exemplar(spec, r) + spec.fewshot_separator for r in shots[: spec.num_fewshot]
        )

    def context(self, row: Row, context: str) -> str:
        text = self.prefix(row) + context
        if not self.spec.chat:
            return text
        if self.model.template is None:
            raise XtunerError(
                f"task {self.spec.name!r} asks for the chat template but the model has none"
            )
        return self.model.template.render_prompt(
            [{"role": "user", "content": text}], self.model.tokenizer
        )


# ----------------------------------------------------------------------------- task kinds
def _accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


Rotation = tuple[int, int, int, list]  # (row index, rotation, gold, requests)


def _rotations(
    spec: TaskSpec, rows: list[Row], row_choices: list[list[str]], builder: PromptBuilder
) -> list[Rotation]:
    """Each row's requests, once or (circular) once per rotation of its options."""
    rotations = []
    for index, (row, choices) in enumerate(zip(rows, row_choices)):
        gold = gold_of(spec, row, len(choices))
        shifts = range(len(choices)) if spec.circular else range(1)
        for shift in shifts:  # option i moves to position (i + shift) % n
            order = [choices[(j - shift) % len(choices)] for j in range(len(choices))]
            requests = [
                (builder.context(row, _with_image(spec, c)), x)
                for c, x in _mcq_requests(spec, row, order)
            ]
            rotations.append((index, shift, (gold + shift) % len(choices), requests))
    return rotations


def _predictions(
    spec: TaskSpec,
    model: LoadedModel,
    scorer: LoglikScorer,
    rotations: list[Rotation],
    images: list[str | None],
) -> dict[int, list[tuple[int, int, int, Any]]]:
    """Per row, (rotation, gold, predicted option, the output or log-likelihoods) of each
    rotation: the model's written letter, or the option of the highest log-likelihood.
    ``images``: each row's image (or None)."""
    per_row: dict[int, list[tuple[int, int, int, Any]]] = defaultdict(list)
    if spec.scoring == "generate":  # the model writes its answer; the letter is extracted
        contexts = [requests[0][0] for *_, requests in rotations]
        shown = [images[index] for index, *_ in rotations]
        outputs = _generate(spec, model, contexts, images=shown)
        for (index, shift, gold, requests), text in zip(rotations, outputs):
            letter = extract_answer(text, "letter", spec.letters[: len(requests)])
            pred = spec.letters.index(letter) if letter else -1
            per_row[index].append((shift, gold, pred, text))
        return per_row
    flat = [pair for *_, requests in rotations for pair in requests]
    shown = [images[index] for index, *_, requests in rotations for _ in requests]
    if any(shown):
        scores = iter(_scores_with_images(spec, model, scorer, flat, shown))
    else:
        scores = iter(scorer.score(flat))
    for index, shift, gold, requests in rotations:
        lls = [next(scores).logprob for _ in requests]
        per_row[index].append((shift, gold, _argmax(lls), lls))
    return per_row


def _scores_with_images(
    spec: TaskSpec,
    model: LoadedModel,
    scorer: LoglikScorer,
    pairs: list[tuple[str, str]],
    images: list[str | None],
) -> list:
    """Log-likelihoods of (context, option) pairs whose contexts show an image (an image-text
    model): each context's image tokens expanded, its image's inputs prefilled with it."""
    reader = image_input_for(model.model, model.tokenizer, model.name)
    if reader is None:
        raise XtunerError(f"task {spec.name!r} shows images: {model.name} is a text model")
    encoded, inputs = [], []
    for (context, option), image in zip(pairs, images):
        ids, continuation = scorer.encode_pair(reader.tokens.in_text(context), option)
        ids, given = reader.prompt(ids, [image] if image else [])
        encoded.append((ids, continuation))
        inputs.append(given)
    return scorer.score_ids(encoded, images=inputs)


def evaluate_mcq(
    spec: TaskSpec, rows: list[Row], model: LoadedModel, data_root, scorer: LoglikScorer
) -> TaskResult:
    row_choices = [choices_of(spec, row) for row in rows]
    rotations = _rotations(spec, rows, row_choices, PromptBuilder(spec, data_root, model))
    per_row = _predictions(spec, model, scorer, rotations, [image_of(spec, r) for r in rows])
    samples, correct, correct_norm, circular = [], [], [], []
    by_subject: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for index, row in enumerate(rows):
        runs = per_row[index]
        shift, gold, pred, lls = runs[0]
        ok = pred == gold
        correct.append(ok)
        sample = {
            "source": row.source,
            "gold": gold,
            "pred": pred,
            "correct": ok,
            "output" if spec.scoring == "generate" else "logprobs": lls,
        }
        if spec.style == "cloze":  # length-normalised by the option's characters (lm-eval's)
            lengths = [len(c) for c in row_choices[index]]
            norm = _argmax([ll / max(n, 1) for ll, n in zip(lls, lengths)])
            correct_norm.append(norm == gold)
            sample["pred_norm"] = norm
        if spec.circular:
            every = all(p == g for _, g, p, _ in runs)
            circular.append(every)
            sample["circular_correct"] = every
        by_subject[row.subject or ""].append((ok, sample.get("circular_correct", ok)))
        samples.append(sample)
    metrics = {"acc": _accuracy(correct)}
    if correct_norm:
        metrics["acc_norm"] = _accuracy(correct_norm)
    if circular:
        metrics["circular_acc"] = _accuracy(circular)
    subjects = {}
    if len(by_subject) > 1:
        subjects = {
            s: {
                "acc": _accuracy([a for a, _ in v]),
                "n": len(v),
                **({"circular_acc": _accuracy([c for _, c in v])} if circular else {}),
            }
            for s, v in sorted(by_subject.items())
        }
        metrics["subject_avg_acc"] = sum(v["acc"] for v in subjects.values()) / len(subjects)
    return TaskResult(spec.name, metrics, len(rows), subjects, samples)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def extract_answer(text: str, how: str, letters: str = "ABCD") -> str | None:
    """The answer inside a generation: last number, a standalone option letter, or a regex."""
    if how == "none":
        return text.strip()
    if how == "last_number":
        numbers = NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    if how == "letter":
        pattern = rf"(?:answer is|answer:|^|\(|\s)\(?([{letters}])\)?(?=[\s.,:)]|$)"
        found = re.findall(pattern, text.strip(), flags=re.IGNORECASE | re.MULTILINE)
        return found[0].upper() if found else None
    if how.startswith("regex:"):
        match = re.search(how[len("regex:") :], text)
        return match.group(1).strip() if match else None
    raise XtunerError(f"unknown extract {how!r} (none, last_number, letter, regex:<pattern>)")


def normalize_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def image_of(spec: TaskSpec, row: Row) -> str | None:
    """The row's image for an image task: a data URL, or a path (relative to its data file)."""
    if spec.image is None:
        return None
    ref = str(field_of(row, spec.image))
    if ref.startswith("data:") or Path(ref).is_absolute():
        return ref
    return str(Path(row.source.rsplit(":", 1)[0]).parent / ref)


def _with_image(spec: TaskSpec, context: str) -> str:
    """An image task's context with the image's placeholder before it."""
    return placed_before(context, 1) if spec.image is not None else context


def _generate(
    spec: TaskSpec,
    model: LoadedModel,
    prompts: list[str],
    max_batch_size: int = 32,
    images: list[str | None] | None = None,
) -> list[str]:
    """Greedy continuations of rendered prompts on the bundled engine (all batched), cut at the
    task's stop words and, for chat prompts, at the template's end of turn; ``images``: each
    prompt's image (an image-text model)."""

    stop_ids = []
    if spec.chat and model.template is not None:
        stop_ids = stop_token_ids(model.template, model.tokenizer)
    engine = InferenceEngine(model.model, model.tokenizer, max_batch_size=max_batch_size)
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens, stop_words=list(spec.stop), stop_token_ids=stop_ids
    )

    def tokenized(texts: list[str]) -> list[list[int]]:
        return [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]

    if not images or all(i is None for i in images):
        return [request.text for request in engine.generate(tokenized(prompts), params)]
    reader = image_input_for(model.model, model.tokenizer, model.name)
    if reader is None:
        raise XtunerError(f"task {spec.name!r} shows images: {model.name} is a text model")
    requests = []
    for prompt, image in zip(tokenized([reader.tokens.in_text(p) for p in prompts]), images):
        prompt, inputs = reader.prompt(prompt, [image] if image else [])
        requests.append(engine.add_request(prompt, params, images=inputs))
    while engine.has_work:
        engine.step()
    return [request.text for request in requests]


def reward_scores(
    reward_model: LoadedModel, conversations: list[list[dict]], batch_size: int = 8
) -> list[float]:
    """A reward model's score of each conversation, rendered with its template."""
    if reward_model.template is None:
        raise XtunerError(f"reward model {reward_model.name} has no chat template")
    llm, tokenizer = reward_model.model, reward_model.tokenizer
    tokens = tokenize_rendered(
        [reward_model.template.render(c, tokenizer) for c in conversations], tokenizer, None
    )
    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        rows = []
        for i in range(start, min(start + batch_size, len(conversations))):
            ids, labels = tokens.sample(i)
            n = len(ids)
            rows.append(
                {"input_ids": ids, "labels": labels, "position_ids": list(range(n)),
                 "cu_seqlens": [0, n], "unit_flags": []}
            )  # fmt: skip
        batch = collate_preference(rows, 0, 32)
        with torch.no_grad():
            scores.extend(sequence_scores(llm, score_head(llm), batch).tolist())
    return scores


def evaluate_generate(
    spec: TaskSpec,
    rows: list[Row],
    model: LoadedModel,
    data_root,
    max_batch_size: int = 32,
    reward_model: LoadedModel | None = None,
) -> TaskResult:
    builder = PromptBuilder(spec, data_root, model)
    outputs = _generate(
        spec,
        model,
        [builder.context(row, _with_image(spec, render(spec.prompt, row))) for row in rows],
        max_batch_size,
        [image_of(spec, row) for row in rows],
    )
    samples, correct = [], []
    for row, text in zip(rows, outputs):
        reference = str(field_of(row, spec.target))
        if spec.target_regex:
            match = re.search(spec.target_regex, reference, flags=re.MULTILINE)
            if not match:
                raise XtunerError(
                    f"{row.source}: {spec.target!r} does not match "
                    f"target_regex {spec.target_regex!r}"
                )
            reference = match.group(1)
        if spec.extract == "last_number":
            reference = normalize_number(reference)
        answer = extract_answer(text, spec.extract, spec.letters)
        ok = answer is not None and (
            answer == reference.strip() if spec.match == "exact" else reference.strip() in answer
        )
        correct.append(ok)
        samples.append(
            {
                "source": row.source,
                "output": text,
                "extracted": answer,
                "reference": reference,
                "correct": ok,
            }
        )
    metrics = {"acc": _accuracy(correct)}
    if reward_model is not None:  # the question as a user turn, the output as the answer
        rewards = reward_scores(
            reward_model,
            [
                [{"role": "user", "content": render(spec.prompt, row)},
                 {"role": "assistant", "content": text}]
                for row, text in zip(rows, outputs)
            ],
        )  # fmt: skip
        metrics["reward"] = sum(rewards) / max(len(rewards), 1)
        for sample, reward in zip(samples, rewards):
            sample["reward"] = reward
    return TaskResult(spec.name, metrics, len(rows), {}, samples)


def evaluate_perplexity(
    spec: TaskSpec, rows: list[Row], model: LoadedModel, scorer: LoglikScorer
) -> TaskResult:
    """Disjoint windows of ``spec.window`` tokens, each predicted from the token before it (or
    the end-of-text token for the first): lm-evaluation-harness's rolling log-likelihood."""
    texts = [str(field_of(row, spec.text)) for row in rows]
    requests, owners = [], []
    for i, text in enumerate(texts):
        ids = scorer.encode(text)
        for start in range(0, len(ids), spec.window):
            context = ids[start - 1 : start] if start else scorer.empty_context
            requests.append((context, ids[start : start + spec.window]))
            owners.append(i)
    scores = scorer.score_ids(requests)
    nll = [0.0] * len(texts)
    tokens = [0] * len(texts)
    for owner, score in zip(owners, scores):
        nll[owner] -= score.logprob
        tokens[owner] += score.num_tokens
    total_nll, total_tokens = sum(nll), sum(tokens)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    total_words = sum(len(t.split()) for t in texts)
    metrics = {
        "perplexity": math.exp(total_nll / max(total_tokens, 1)),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "word_perplexity": math.exp(total_nll / max(total_words, 1)),
    }
    samples = [
        {"source": row.source, "nll": n, "tokens": t} for row, n, t in zip(rows, nll, tokens)
    ]
    return TaskResult(spec.name, metrics, len(rows), {}, samples)


PREFERENCE_BATCH = 4  # pairs per forward


def pair_margins(model: LoadedModel, data: PreferenceData) -> tuple[list[float], str]:
    """Per pair, how much more the model prefers chosen over rejected, and by what measure:
    a reward model's score difference; an adapter's implicit reward (its log-ratio against
    the adapter-disabled base, DPO's reward with beta 1); else the mean token log-probability
    difference (length-normalized, reference-free)."""
    llm = model.model
    reference = Reference()
    margins: list[float] = []
    head = model_head(llm)
    for start in range(0, len(data), PREFERENCE_BATCH):
        rows = [data.row(i) for i in range(start, min(start + PREFERENCE_BATCH, len(data)))]
        batch = collate_preference(rows, 0, 32)
        with torch.no_grad():
            if head == "reward":
                scores = sequence_scores(llm, score_head(llm), batch)
            elif hasattr(llm, "disable_adapter"):
                scores = sequence_logps(llm, batch).total - reference.logps(llm, batch).total
            else:
                scores = sequence_logps(llm, batch).mean
        margins.extend((scores[0::2] - scores[1::2]).tolist())
    how = {
        "reward": "reward model score",
        "lm": "implicit reward vs the adapter-disabled base"
        if hasattr(llm, "disable_adapter")
        else "mean token log-probability",
    }[head]
    return margins, how


def evaluate_preference(spec: TaskSpec, rows: list[Row], model: LoadedModel) -> TaskResult:
    """Pairwise accuracy on held-out preference pairs (see :func:`pair_margins`)."""
    if model.template is None:
        raise XtunerError(
            f"task {spec.name!r}: preference pairs are rendered with a chat template, and "
            f"{model.name} has none; pass --template"
        )
    data, kept = preference_units(
        [r.fields for r in rows], model.tokenizer, model.template, spec.max_length, spec.name
    )
    margins, how = pair_margins(model, data)
    samples = [
        {"source": rows[i].source, "margin": m, "scored_by": how} for i, m in zip(kept, margins)
    ]
    metrics = {
        "acc": _accuracy([m > 0 for m in margins]),
        "margin": sum(margins) / max(len(margins), 1),
    }
    return TaskResult(spec.name, metrics, len(margins), {}, samples)


def evaluate_model(
    model: LoadedModel,
    tasks: list[TaskSpec],
    data_root=None,
    limit: int | None = None,
    seed: int = 0,
    batch_tokens: int = 4096,
    reward_model: LoadedModel | None = None,
) -> dict[str, TaskResult]:
    """Every task on one model; ``limit`` scores a seeded subset of each task's rows;
    ``reward_model`` also scores generation tasks' outputs."""
    scorer = LoglikScorer(model.model, model.tokenizer, batch_tokens=batch_tokens)
    results = {}
    for spec in tasks:
        rows = load_rows(spec, data_root, limit=limit, seed=seed)
        if spec.kind == "mcq":
            results[spec.name] = evaluate_mcq(spec, rows, model, data_root, scorer)
        elif spec.kind == "generate":
            results[spec.name] = evaluate_generate(
                spec, rows, model, data_root, reward_model=reward_model
            )
        elif spec.kind == "preference":
            results[spec.name] = evaluate_preference(spec, rows, model)
        else:
            results[spec.name] = evaluate_perplexity(spec, rows, model, scorer)
    return results
