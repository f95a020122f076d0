import json

import numpy as np
import pytest

from xtuner_lite.data import IGNORE_INDEX, get_map_fn, load_rows, process_dataset
from xtuner_lite.errors import DataError
from xtuner_lite.toolcalling import get_tool_format

from conftest import shared_file

REAL_FILES = [
    ("sft/llamafactory_alpaca_en_demo.json", "alpaca"),
    ("sft/llamafactory_alpaca_zh_demo.json", "alpaca_zh"),
    ("sft/llamafactory_glaive_toolcall_en_demo.json", "sharegpt"),
    ("sft/llamafactory_glaive_toolcall_zh_demo.json", "sharegpt"),
    ("sft/fastchat_dummy_conversation_sharegpt.json", "sharegpt"),
    ("sft/xtuner_openai_sft.jsonl", "openai"),
    ("sft/xtuner_sft_text_example_data.jsonl", "openai"),
    ("sft/llamafactory_oaast_sft_zh.json", "history"),
    ("sft/llamafactory_lima.json", "history"),
]


def _trained_runs(labels):
    """Decoded spans of consecutive trained labels."""
    runs, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(label)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("relative, map_fn", REAL_FILES)
def test_real_files_train_exactly_the_assistant_turns(relative, map_fn, smol_tokenizer):
    path = shared_file(relative)
    out = process_dataset(
        path,
        smol_tokenizer,
        map_fn=map_fn,
        template="smollm2",
        max_length=8192,
        pack=False,
        shuffle=False,
        use_cache=False,
    )
    raw = load_rows(path)
    assert out.stats.rows_loaded == len(raw) == out.stats.samples
    assert out.stats.rows_skipped == {}
    fn = get_map_fn(map_fn)
    for i in range(0, len(raw), max(1, len(raw) // 40)):  # ~40 rows spread over the file
        if out.data.sample_lengths[i] == 8192:
            continue  # truncated: the last turn may be cut
        conv = fn(raw.records[i])
        # tool calls are trained as the template writes them (<tool_call> blocks)
        messages = get_tool_format("hermes").rewrite(conv["messages"], conv.get("tools"), None)
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        row = out.data.row(i)
        got = [smol_tokenizer.decode(run) for run in _trained_runs(row["labels"])]
        assert got == expected, f"{relative} row {i}"
        text = smol_tokenizer.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")


def test_alpaca_packed_at_2048(smol_tokenizer):
    path = shared_file("sft/llamafactory_alpaca_en_demo.json")
    out = process_dataset(
        path, smol_tokenizer, map_fn="alpaca", template="smollm2", max_length=2048, use_cache=False
    )
    stats = out.stats
    assert stats.samples == 999 and stats.rows_truncated == 0
    assert stats.packing_efficiency > 0.97
    assert out.data.sample_lengths.sum() == stats.tokens
    for i in range(len(out.data)):
        row = out.data.row(i)
        assert len(row["input_ids"]) <= 2048
        assert row["cu_seqlens"][-1] == len(row["input_ids"])
        starts = np.array(row["cu_seqlens"][:-1])
        assert (np.array(row["position_ids"])[starts] == 0).all()


def test_cache_second_run_loads_and_changes_invalidate(tmp_path, smol_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]))
    kw = dict(tokenizer=smol_tokenizer, map_fn="alpaca", template="smollm2", max_length=64)
    first = process_dataset(path, **kw)
    second = process_dataset(path, **kw)
    assert not first.stats.from_cache and second.stats.from_cache
    assert (first.data.input_ids == second.data.input_ids).all()
    assert not process_dataset(path, **{**kw, "max_length": 65}).stats.from_cache
    path.write_text(json.dumps([{"instruction": "changed", "output": "x"}]))
    third = process_dataset(path, **kw)
    assert not third.stats.from_cache and third.stats.samples == 1


def test_multiprocess_equals_single_process(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"instruction": f"question {i}" * (i % 7 + 1), "output": f"answer {i}"})
            for i in range(5000)
        )
    )
    kw = dict(
        tokenizer=smol_tokenizer,
        map_fn="alpaca",
        template="smollm2",
        max_length=256,
        use_cache=False,
    )
    one = process_dataset(path, num_proc=1, **kw)
    two = process_dataset(path, num_proc=2, **kw)
    assert (one.data.input_ids == two.data.input_ids).all()
    assert (one.data.labels == two.data.labels).all()


def test_bad_row_is_named_or_skipped_and_counted(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    lines = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q"}, {"output": 5}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    kw = dict(tokenizer=smol_tokenizer, map_fn="alpaca", template="smollm2", max_length=64)
    with pytest.raises(DataError, match=r"d.jsonl, line 4, field 'output': missing"):
        process_dataset(path, **kw)
    out = process_dataset(path, skip_invalid=True, **kw)
    assert out.stats.samples == 3
    assert sum(out.stats.rows_skipped.values()) == 2
    assert any("line 5" in e for e in out.stats.skipped_examples)


def test_empty_result_is_an_error(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "q"}))
    with pytest.raises(DataError, match="no usable rows"):
        process_dataset(
            path, smol_tokenizer, map_fn="alpaca", template="smollm2", skip_invalid=True
        )


def test_truncation_is_counted_and_untrainable_rows_skipped(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [
        {"instruction": "short", "output": "word " * 100},
        {"instruction": "long " * 200, "output": "x"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = process_dataset(
        path, smol_tokenizer, map_fn="alpaca", template="smollm2", max_length=80, use_cache=False
    )
    assert out.stats.rows_truncated == 1 and out.stats.samples == 1
    assert list(out.stats.rows_skipped.values()) == [1]
    assert out.data.sample_lengths.max() == 80


def test_pretrain_trains_every_token_but_the_first(tmp_path, smol_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "The quick brown fox."}))
    out = process_dataset(
        path, smol_tokenizer, map_fn="pretrain", template="smollm2", max_length=64, use_cache=False
    )
    row = out.data.row(0)
    assert smol_tokenizer.decode(row["input_ids"]) == "The quick brown fox.<|im_end|>"
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]


LONG = 32768


def _long_sources(tmp_path) -> tuple:
    """Wikipedia articles (one more joins the three longest: longer than LONG) as pretraining
    documents, and LIMA's answers chained into conversations of 10 to 120 turns."""
    articles = shared_file("raw/llamafactory_wiki_demo.txt").read_text().splitlines()
    longest = sorted(articles, key=len)[-3:]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in [*articles, " ".join(longest)]))
    lima = json.loads(shared_file("sft/llamafactory_lima.json").read_text())
    chats, start = [], 0
    for turns in (10, 40, 80, 120):
        pairs = lima[start : start + turns]
        start += turns
        messages = [
            {"role": role, "content": r[key]}
            for r in pairs
            for role, key in (("user", "instruction"), ("assistant", "output"))
        ]
        chats.append({"messages": messages})
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text("\n".join(json.dumps(c) for c in chats))
    return (docs, "pretrain"), (conversations, "openai")


def test_long_documents_and_conversations_pack_into_32k_rows(tmp_path, smol_tokenizer):
    """Rows of 32k tokens: samples kept whole and packed together, what is longer truncated to
    max_length and counted, the length statistics those of the samples."""
    for path, map_fn in _long_sources(tmp_path):
        kw = dict(tokenizer=smol_tokenizer, map_fn=map_fn, template="smollm2", use_cache=False)
        whole = process_dataset(path, max_length=10**6, pack=False, **kw).data.sample_lengths
        out = process_dataset(path, max_length=LONG, pack=True, **kw)
        data, stats = out.data, out.stats
        longer = int((whole > LONG).sum())
        assert longer >= 1 and stats.rows_truncated == longer
        assert sorted(data.sample_lengths.tolist()) == sorted(np.minimum(whole, LONG).tolist())
        rows = [data.row(i) for i in range(len(data.row_sizes))]
        assert max(len(r["input_ids"]) for r in rows) <= LONG
        assert len(rows) < len(whole)  # several samples share a row
        for row in rows:  # every sample starts at position 0 of its own segment
            assert row["position_ids"][0] == 0 and row["cu_seqlens"][-1] == len(row["input_ids"])
        assert stats.lengths["max"] == LONG
        assert stats.lengths["p50"] == pytest.approx(np.percentile(data.sample_lengths, 50))
        if map_fn == "openai":  # a truncated conversation still trains its assistant turns
            truncated = data.sample_lengths == LONG
            assert stats.trained_tokens < stats.tokens and truncated.any()
