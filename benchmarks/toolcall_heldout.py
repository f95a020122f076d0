"""Tool calling before vs after LoRA fine-tuning of SmolLM2-135M-Instruct, on held-out data,
with 95 % Wilson intervals.

Training data: a seeded 90 % of glaive's English tool-call demo (``../shared/data``) plus the
seeded calculator conversations (``examples/data/calculator_train.jsonl``). Measured on the other
10 % of glaive and on ``calculator_test.jsonl`` (greedy):

- *call*: turns whose reference is a call: the model emits the reference's calls exactly, well
  formed, right tool, same arguments (*call, right tool*: the same tool names, any arguments);
- *direct*: turns that follow a user message and whose reference is a plain answer (no tool
  needed): the model answers without calling; *after*: the same for turns that follow a tool
  result (the model answers from it rather than calling again);
- *arithmetic*: calculator test questions answered with the exact number, by the fine-tuned
  model with the calculator tool and without any tool.

    python benchmarks/toolcall_heldout.py --max-iters 60
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from xtuner_lite.commands.train import train
from xtuner_lite.data.map_fns import get_map_fn
from xtuner_lite.evaluation.intervals import wilson
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.chat_model import ChatModel
from xtuner_lite.toolcalling import ToolBox, load_tools, run_tool_turns

ROOT = Path(__file__).resolve().parents[1]
GLAIVE = ROOT.parent / "shared" / "data" / "sft" / "llamafactory_glaive_toolcall_en_demo.json"
CALC_TRAIN = ROOT / "xtuner_lite" / "examples" / "data" / "calculator_train.jsonl"
CALC_TEST = ROOT / "xtuner_lite" / "examples" / "data" / "calculator_test.jsonl"
MODEL = "smollm2-135m-instruct"


def split_glaive(folder: Path, seed: int = 0) -> tuple[Path, list[dict]]:
    rows = json.loads(GLAIVE.read_text())
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: len(rows) // 10])
    train_path = folder / "glaive_train.json"
    train_path.write_text(json.dumps([r for i, r in enumerate(rows) if i not in held]))
    return train_path, [r for i, r in enumerate(rows) if i in held]


def turns(rows: list[dict]) -> list[tuple[list[dict], list[dict], dict]]:
    """(context messages, tools, reference assistant message) for every assistant turn."""
    out = []
    for row in rows:
        conv = get_map_fn("sharegpt")(row)
        messages, tools = conv["messages"], conv.get("tools")
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant" and i > 0:
                out.append((messages[:i], tools, msg))
    return out


def call_scores(chat: ChatModel, engine: InferenceEngine, cases, log: Path) -> dict[str, list[int]]:
    """Each held-out turn's reply scored by what its reference does (see the module docstring);
    the replies go to ``log``."""
    params = chat.sampling(SamplingParams(max_new_tokens=96), tools=True)
    prompts = [chat.prompt_ids(context, tools) for context, tools, _ in cases]
    replies = [engine.decode(ids) for ids in engine.generate(prompts, params)]
    scores: dict[str, list[int]] = {"call": [], "call, right tool": [], "direct": [], "after": []}
    with log.open("w") as out:
        for (context, tools, reference), reply in zip(cases, replies):
            parsed = chat.tool_format.parse(reply, tools)
            out.write(json.dumps({"reference": reference, "reply": reply}) + "\n")
            if reference.get("tool_calls"):
                names = [c["name"] for c in reference["tool_calls"]]
                scores["call"].append(int(parsed.calls == reference["tool_calls"]))
                scores["call, right tool"].append(int([c["name"] for c in parsed.calls] == names))
            else:
                kind = "after" if context[-1]["role"] == "tool" else "direct"
                scores[kind].append(
                    int(not parsed.calls and not parsed.errors and bool(parsed.content))
                )
    return scores


def arithmetic(chat: ChatModel, engine: InferenceEngine, with_tool: bool) -> list[int]:
    """Each test question answered (all in one batch per round), scored by its exact number."""
    rows = [json.loads(line) for line in CALC_TEST.read_text().splitlines()]
    params = chat.sampling(SamplingParams(max_new_tokens=64), tools=with_tool)
    toolbox = ToolBox(load_tools("calculator"))
    tools = toolbox.schemas if with_tool else None

    def generate(conversations: list[list[dict]]) -> list[str]:
        prompts = [chat.prompt_ids(messages, tools) for messages in conversations]
        return [engine.decode(ids) for ids in engine.generate(prompts, params)]

    questions = [[{"role": "user", "content": r["conversations"][0]["value"]}] for r in rows]
    if with_tool:
        answers = [t.answer for t in run_tool_turns(generate, questions, toolbox, chat.tool_format)]
    else:
        answers = generate(questions)
    hits = []
    for row, answer in zip(rows, answers):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", answer.replace(",", ""))
        hits.append(int(row["answer"] in numbers))
    return hits


def line(name: str, hits: list[int]) -> str:
    low, high = wilson(sum(hits), len(hits))
    return f"{name}: {sum(hits) / len(hits):.3f} [{low:.3f}, {high:.3f}] (n={len(hits)})"


def evaluate(label: str, adapter: str | None, cases, work: Path) -> None:
    chat = ChatModel.load(MODEL, adapter)
    engine = InferenceEngine(chat.model, chat.tokenizer)
    for name, hits in call_scores(chat, engine, cases, work / f"{label}_replies.jsonl").items():
        print(line(f"{label} {name}", hits), flush=True)
    print(line(f"{label} arithmetic with calculator", arithmetic(chat, engine, True)), flush=True)
    print(line(f"{label} arithmetic without tools", arithmetic(chat, engine, False)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iters", type=int, default=60)
    parser.add_argument("--work-dir", default="work_dirs/toolcall_heldout")
    parser.add_argument("--eval-only", action="store_true", help="the untrained model only")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    glaive_train, held_out = split_glaive(work)
    cases = turns(held_out)
    evaluate("before", None, cases, work)
    if args.eval_only:
        return
    adapter = train(
        "smollm2_135m_toolcall_lora",
        work_dir=str(work / "run"),
        overwrite=True,
        cfg_options={
            "train_dataset.data_files": [str(glaive_train), str(CALC_TRAIN)],
            "train.max_iters": args.max_iters,
        },
    )
    evaluate("after", str(adapter), cases, work)


if __name__ == "__main__":
    main()
