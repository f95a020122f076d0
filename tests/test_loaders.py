import json

import pytest

from xtuner_lite.data.loaders import load_rows
from xtuner_lite.errors import DataError


def test_json_jsonl_csv_parquet_and_saved_folder(tmp_path):
    import datasets

    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "x.csv", index=False)
    ds.to_parquet(tmp_path / "x.parquet")
    ds.save_to_disk(tmp_path / "saved")
    for name in ("x.json", "x.jsonl", "x.csv", "x.parquet", "saved"):
        loaded = load_rows(tmp_path / name)
        got = [{k: (v or "") for k, v in r.items()} for r in loaded.records]
        assert got == rows, name


def test_jsonl_rows_are_located_by_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    rows = load_rows(tmp_path / "x.jsonl")
    assert rows.locate(1) == "line 3"


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "file is empty"),
        (b"  \n", "file is empty"),
        (b'{"a": 1}\n{"a": 2\n', "line 2"),
        (b'{"a": 1}\n{"a": "caf\xe9"}\n', "not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_invalid_json_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=r"bad.json, line 3: invalid JSON"):
        load_rows(path)


def test_non_utf8_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n{"a": "ok"},\n{"a": "\xff"}\n]')
    with pytest.raises(DataError, match=r"line 3.*not valid UTF-8"):
        load_rows(path)


def test_missing_file_and_offline_hub_id_are_clear(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "nope.json")
    with pytest.raises(DataError, match="could not be loaded as a hub dataset"):
        load_rows("someone/some-dataset-that-is-not-here")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("header.csv", "instruction,output\n", "header.csv: the file has a header and no rows"),
        ("ragged.csv", "instruction,output\nhi,there\nbad,row,extra\n",
         "ragged.csv, line 3: 3 fields, but the header names 2"),
        ("ragged.tsv", "a\tb\nx\ty\tz\n", "ragged.tsv, line 2: 3 fields, but the header names 2"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: JSON nested too deeply"),
        ("deep.jsonl", '{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
         "deep.jsonl, line 2: JSON nested too deeply"),
    ],
    ids=["header.csv", "ragged.csv", "ragged.tsv", "deep.json", "deep.jsonl"],
)  # fmt: skip
def test_ragged_tables_and_deep_json_are_named_errors(tmp_path, name, content, message):
    """These came back as datasets' 'An error occurred while generating the dataset', a hub
    message about "train" and a RecursionError."""
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        load_rows(tmp_path / name)
    assert message in str(err.value)
