"""`xtuner data prepare`: config validation, input errors, each stage, the whole run (workers 1
and 2 give the same output), SFT rows kept as they are, and the planted-truth scores."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import time
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.writers import JsonlWriter

from xtuner_lite.cli import main as cli_main
from xtuner_lite.data import process_dataset
from xtuner_lite.dataprep import load_prepare_config, load_report, prepare
from xtuner_lite.dataprep.runs import lsh_bands, lsh_threshold
from xtuner_lite.dataprep.settings import PrepareConfigError
from xtuner_lite.dataprep.stages import (
    BlocklistFilter,
    DecontaminateFilter,
    HtmlToText,
    LanguageFilter,
    MaskPII,
    Normalize,
    eval_grams,
)
from xtuner_lite.errors import XtunerError

from conftest import ROOT, shared_file

WORDS = {
    "subject": "farmer teacher baker sailor doctor painter student miner pilot gardener".split(),
    "adjective": "quiet busy narrow ancient sunny muddy crowded hidden wooden golden".split(),
    "verb": "visited cleaned painted repaired watched crossed measured photographed".split(),
    "place": "bridge garden harbour market library orchard station valley tower meadow".split(),
    "time": "morning evening winter spring weekend afternoon".split(),
}


def paragraph(rng: random.Random, sentences: int = 14) -> str:
    """Plain English prose from a small grammar (passes the quality filters)."""
    out = []
    for _ in range(sentences):
        words = [
            rng.choice(["The", "A", "This", "That", "One"]),
            rng.choice(WORDS["adjective"]),
            rng.choice(WORDS["subject"]),
            rng.choice(WORDS["verb"]),
            rng.choice(["the", "a", "every", "their", "our"]),
            rng.choice(WORDS["adjective"]),
            rng.choice(WORDS["place"]),
            rng.choice(["in", "near", "behind", "beyond", "after"]),
            rng.choice(["the", "that", "each", "some"]),
            rng.choice(WORDS["time"] + WORDS["place"]),
        ]
        out.append(" ".join(words) + ".")
    return " ".join(out)


CHINESE = "细胞理论是生物科学的一个理论，它认为所有生命体都是由微小的基本单元细胞所构成。" * 4


@pytest.fixture
def raw_file(tmp_path) -> Path:
    rng = random.Random(0)
    docs = [paragraph(rng) for _ in range(12)]
    docs.append(docs[0])  # exact duplicate
    near = docs[1].split(" ")
    near[5] = "suddenly"
    docs.append(" ".join(near))  # near duplicate (one word changed)
    docs.append(CHINESE)
    docs.append(paragraph(rng) + " Mail me at jane.doe@example.org or call +1 415 555 2671.")
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def run_config(files, out: Path, stages: list[dict], kind="text", **run) -> dict:
    return dict(
        inputs=dict(data_files=[str(f) for f in files], kind=kind),
        stages=stages,
        output=str(out),
        run=dict(tasks=run.pop("tasks", 2), workers=run.pop("workers", 1)),
    )


ALL_TEXT_STAGES = [
    dict(type="normalize"),
    dict(type="language", languages=["en"]),
    dict(type="gopher_repetition"),
    dict(type="gopher_quality"),
    dict(type="pii"),
    dict(type="blocklist", words=["casino"]),
    dict(type="exact_dedup"),
    dict(type="minhash_dedup"),
]


def trained_samples(out: Path, map_fn: str) -> int:
    """Samples `xtuner train`'s data pipeline reads from the output shards."""
    shards = str(out / "data" / "*.jsonl")
    processed = process_dataset(shards, "smollm2-135m-instruct", map_fn=map_fn, use_cache=False)
    return processed.stats.samples


def output_rows(out: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((out / "data").glob("*.jsonl")) for x in p.open()]


def config_problems(cfg: dict) -> str:
    """The one error a bad config raises, as text."""
    with pytest.raises(PrepareConfigError) as err:
        load_prepare_config(cfg)
    return str(err.value)


# config validation ----------------------------------------------------------------------------


def test_config_problems_are_collected_and_named(tmp_path, raw_file):
    cfg = run_config(
        [raw_file],
        tmp_path / "out",
        [
            dict(type="languag"),
            dict(type="minhash_dedup", ngrams=5),
            dict(type="language", min_score="high"),
            dict(type="normalize"),
        ],
        kind="sft",
    )
    cfg["stagse"] = []
    text = config_problems(cfg)
    assert "5 problem(s)" in text
    assert "stages[0].type: unknown stage 'languag'; did you mean 'language'?" in text
    assert "stages[1] (minhash_dedup): unknown setting 'ngrams'; did you mean 'ngram'?" in text
    assert "stages[2] (language).min_score: expected float, got 'high'" in text
    assert "stages[3] (normalize): rewrites text" in text
    assert "unknown section 'stagse'; did you mean 'stages'?" in text


def test_config_names_missing_inputs_and_bad_run(tmp_path):
    cfg = dict(
        inputs=dict(data_files=[str(tmp_path / "nope.jsonl")]),
        stages=[],
        output="o",
        run=dict(workers=0, executor="spark"),
    )
    text = config_problems(cfg)
    assert "nope.jsonl not found" in text
    assert "run.workers: expected a positive integer, got 0" in text
    assert "run.executor" in text


# input errors, raised from inside the datatrove tasks -----------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl, line 2: invalid JSON"),
        (b'{"text": "fine"}\n{"txt": "x"}\n', "bad.jsonl, line 2, field 'text': missing"),
        (b'{"text": 3}\n', "bad.jsonl, line 1, field 'text': expected a string"),
        ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "bad.jsonl, line 1: not UTF-8"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(XtunerError, match="bad.jsonl") as err:
        prepare(run_config([bad], tmp_path / "out", [dict(type="normalize")]), quiet=True)
    assert expected in str(err.value)


def test_a_byte_order_mark_is_read_as_the_training_loader_reads_it(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes('{"text": "first"}\n{"text": "second"}\n'.encode("utf-8-sig"))
    prepare(run_config([src], tmp_path / "out", [dict(type="normalize")]), quiet=True)
    assert sorted(r["text"] for r in output_rows(tmp_path / "out")) == ["first", "second"]


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    config = tmp_path / "prep.py"
    config.write_text(
        f"inputs = dict(data_files=[{str(tmp_path / 'x.jsonl')!r}])\n"
        "stages = [dict(type='dedup')]\noutput = 'o'\n"
    )
    assert cli_main(["data", "prepare", str(config)]) == 1
    err = capsys.readouterr().err
    assert "unknown stage 'dedup'" in err and "x.jsonl not found" in err
    assert "Traceback" not in err


# stages ---------------------------------------------------------------------------------------


def run_step(step, texts: list[str]) -> list[Document]:
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    return list(step.run(iter(docs)))


def test_normalize_forms_and_spaces():
    (doc,) = run_step(Normalize(), ["  ｆｕｌｌ\u3000width   text\n\n\n\nnext  "])
    assert doc.text == "full width text\n\nnext"


def test_pii_masks_and_counts():
    text = "Mail jane.doe@example.org, server 8.8.8.8, local 192.168.0.1, call +1 415 555 2671."
    (doc,) = run_step(MaskPII(), [text])
    assert "jane.doe@example.org" not in doc.text and "8.8.8.8" not in doc.text
    assert "192.168.0.1" in doc.text  # private addresses are not PII
    assert "<phone>" in doc.text and "555 2671" not in doc.text
    assert doc.metadata["pii"] == {"email": 1, "ip": 1, "phone": 1}
    (plain,) = run_step(MaskPII(), ["In 1998 there were 12 000 people and 3.5 km of road."])
    assert "pii" not in plain.metadata and "<phone>" not in plain.text


def test_language_blocklist_and_decontamination_filters():
    english = "The farmer walked along the quiet street with the children before noon."
    kept = run_step(LanguageFilter(["en"]), [english, CHINESE])
    assert [d.metadata["language"] for d in kept] == ["en"]
    kept = run_step(BlocklistFilter(["casino bonus"]), ["a Casino Bonus here", "casinos bonuses"])
    assert [d.text for d in kept] == ["casinos bonuses"]  # whole words only
    grams = eval_grams(["Janet's ducks lay 16 eggs per day and she eats three"], 8)
    kept = run_step(
        DecontaminateFilter(grams, 8),
        ["Intro. Janet's ducks lay 16 eggs per day and she eats three. End", english],
    )
    assert [d.text for d in kept] == [english]


ARTICLE = (
    "<html><head><title>Harbour notes</title></head><body>"
    "<nav>Home | About | Contact | Subscribe</nav><article><h1>The harbour at dawn</h1>"
    "<p>{0}</p><p>{1}</p></article><footer>Copyright 2026, all rights reserved</footer>"
    "</body></html>"
)


class HangsOnMarker(HtmlToText):
    """An extractor that hangs on a page containing HANG (as on a pathological page)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extractor.extract = functools.partial(hang_on_marker, self.extractor.extract)


def hang_on_marker(extract, text: str) -> str:
    if "HANG" in text:
        time.sleep(60)
    return extract(text)


def test_html_to_text_keeps_main_text_and_names_each_failure(tmp_path):
    rng = random.Random(3)
    body = [paragraph(rng, 3), paragraph(rng, 3)]
    pages = [ARTICLE.format(*body), "<html><body><script>x=1</script></body></html>", "HANG"]
    removed = JsonlWriter(str(tmp_path), output_filename="removed.jsonl", compression=None)
    kept = run_step(HangsOnMarker(timeout=3.0, exclusion_writer=removed), pages)
    assert len(kept) == 1 and kept[0].text.startswith("The harbour at dawn")
    assert body[0] in kept[0].text and body[1] in kept[0].text
    assert "Subscribe" not in kept[0].text and "Copyright" not in kept[0].text
    reasons = [
        json.loads(line)["metadata"]["filter_reason"] for line in open(removed_file(tmp_path))
    ]
    assert reasons == ["html_no_main_text", "html_timeout"]


def removed_file(folder: Path) -> Path:
    (path,) = folder.glob("removed.jsonl")
    return path


def test_lsh_threshold_picks_bands():
    assert lsh_threshold(14, 8) == pytest.approx((1 / 14) ** (1 / 8))
    buckets, per = lsh_bands(112, 0.5)
    assert buckets * per == 112 and abs(lsh_threshold(buckets, per) - 0.5) < 0.1


# whole runs -----------------------------------------------------------------------------------


def test_prepare_text_end_to_end(tmp_path, raw_file, capsys):
    out = tmp_path / "out"
    report = prepare(run_config([raw_file], out, ALL_TEXT_STAGES), quiet=True)
    rows = output_rows(out)
    texts = [r["text"] for r in rows]
    assert report["documents_in"] == 16
    assert report["documents_out"] == len(rows) == 13  # the Chinese doc and two duplicates go
    removed = {s["type"]: s["removed"] for s in report["stages"]}
    assert removed["language"] == {"other_language": 1}
    assert removed["exact_dedup"] == {"exact_duplicate": 1}
    assert removed["minhash_dedup"] == {"near_duplicate": 1}
    assert sum(sum(s["removed"].values()) for s in report["stages"]) == 3
    assert not any("jane.doe@example.org" in t or "555 2671" in t for t in texts)
    assert report["pii_masked_in_kept"] == {"email": 1, "phone": 1}
    assert report["languages"]["en"] == 15
    assert {"lengths.png", "quality_signals.png"} <= {Path(p).name for p in report["plots"]}
    assert not list((out / "_work").glob("before_*"))  # intermediate copies dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents_out"] == 13 and manifest["inputs"][0]["sha256"]
    assert trained_samples(out, "pretrain") == 13  # the shards are training input as they are
    assert cli_main(["data", "report", str(out)]) == 0
    assert "near_duplicate: 1" in capsys.readouterr().out


def test_html_pages_and_html_rows_become_training_text(tmp_path):
    rng = random.Random(4)
    latin = paragraph(rng, 3).replace("garden", "café")
    (tmp_path / "a.html").write_text(ARTICLE.format(paragraph(rng, 3), paragraph(rng, 3)))
    declared = ARTICLE.replace("<head>", '<head><meta charset="iso-8859-1">')
    (tmp_path / "b.htm").write_bytes(declared.format(latin, paragraph(rng, 3)).encode("latin-1"))
    (tmp_path / "c.html").write_text("<html><body><script>x=1</script></body></html>")
    row = {"url": "https://example.org", "html": ARTICLE.format(paragraph(rng, 3), "More.")}
    (tmp_path / "crawl.jsonl").write_text(json.dumps(row) + "\n")
    files = [tmp_path / n for n in ("a.html", "b.htm", "c.html", "crawl.jsonl")]
    cfg = run_config(files, tmp_path / "out", [dict(type="html_to_text"), dict(type="normalize")])
    cfg["inputs"]["text_key"] = "html"  # for the jsonl rows; pages are read whole
    report = prepare(cfg, quiet=True)
    texts = [r["text"] for r in output_rows(tmp_path / "out")]
    assert report["documents_in"] == 4 and len(texts) == 3
    assert report["stages"][0]["removed"] == {"html_no_main_text": 1}
    assert all(t.startswith("The harbour at dawn") and "<" not in t for t in texts)
    assert any("café" in t for t in texts)  # decoded as the page's declared charset
    assert trained_samples(tmp_path / "out", "pretrain") == 3


def test_html_config_problems(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(ARTICLE)
    text = config_problems(
        run_config([page], tmp_path / "o", [dict(type="normalize"), dict(type="html_to_text")])
    )
    assert "stages[1] (html_to_text): must be the first stage" in text
    assert "p.html is an HTML page; make dict(type='html_to_text') the first stage" in text
    text = config_problems(run_config([page], tmp_path / "o", [], kind="sft"))
    assert "pages are text, not SFT rows" in text
    undeclared = tmp_path / "u.html"
    undeclared.write_bytes(ARTICLE.format("caf\xe9", "x").encode("latin-1"))
    with pytest.raises(XtunerError, match=r"u.html, file: not UTF-8"):
        prepare(run_config([undeclared], tmp_path / "o", [dict(type="html_to_text")]), quiet=True)
    for charset in ("undefined", "no-such-charset", "base64"):  # UnicodeError escaped here
        page.write_text(ARTICLE.replace("<head>", f'<head><meta charset="{charset}">'))
        with pytest.raises(XtunerError, match=rf"p.html, file: cannot decode as its declared "
                                              rf"charset '{charset}'"):  # fmt: skip
            prepare(run_config([page], tmp_path / "o", [dict(type="html_to_text")]), quiet=True)


def test_one_and_two_workers_give_identical_output(tmp_path, raw_file):
    stages = [dict(type="normalize"), dict(type="exact_dedup"), dict(type="minhash_dedup")]
    shards = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(run_config([raw_file], out, stages, tasks=3, workers=workers), quiet=True)
        shards.append({p.name: p.read_bytes() for p in (out / "data").glob("*.jsonl")})
    assert shards[0] == shards[1] and len(shards[0]) == 3


@pytest.mark.integration
def test_ray_executor_gives_the_local_output(tmp_path, raw_file):
    """datatrove's Ray executor on a local Ray instance: the same shards as the local one."""
    import ray  # the ray extra, part of the test requirements

    stages = [dict(type="normalize"), dict(type="language", languages=["en"]),
              dict(type="exact_dedup"), dict(type="minhash_dedup")]  # fmt: skip
    shards = []
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cfg = run_config([raw_file], out, stages, tasks=2, workers=2)
        cfg["run"].update(executor=executor, ray=dict(init=dict(num_cpus=2)))
        report = prepare(cfg, quiet=True)
        assert report["documents_out"] == 13
        shards.append({p.name: p.read_bytes() for p in (out / "data").glob("*.jsonl")})
    ray.shutdown()
    assert shards[0] == shards[1] and len(shards[0]) == 2


def test_sft_rows_are_kept_as_they_are(tmp_path):
    rng = random.Random(1)
    rows = [
        {
            "instruction": f"Question {i}: {paragraph(rng, 3)}",
            "input": "",
            "output": paragraph(rng, 4),
        }
        for i in range(6)
    ]
    rows.append(dict(rows[0]))  # duplicate row
    rows.append({"instruction": "翻译这句话。", "input": "", "output": CHINESE})
    src = tmp_path / "sft.json"
    src.write_text(json.dumps(rows, ensure_ascii=False))
    out = tmp_path / "out"
    stages = [dict(type="language", languages=["en"]), dict(type="exact_dedup")]
    report = prepare(run_config([src], out, stages, kind="sft"), quiet=True)
    assert sorted(output_rows(out), key=lambda r: r["instruction"]) == sorted(
        rows[:6], key=lambda r: r["instruction"]
    )
    assert report["documents_out"] == 6
    assert trained_samples(out, "alpaca") == 6


@pytest.mark.integration
def test_decontaminate_against_a_bundled_task(tmp_path):
    """The stage reads a task the way `xtuner eval --data-root` does (here GSM8K's test set)."""
    gsm = shared_file("eval/gsm8k_test.jsonl")
    question = json.loads(gsm.open().readline())["question"]
    rng = random.Random(2)
    src = tmp_path / "docs.jsonl"
    docs = [paragraph(rng), paragraph(rng) + " " + question]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stage = dict(type="decontaminate", tasks=["gsm8k"], data_root=str(gsm.parent))
    report = prepare(run_config([src], tmp_path / "out", [stage]), quiet=True)
    assert report["stages"][0]["removed"] == {"contaminated": 1}
    assert [r["text"] for r in output_rows(tmp_path / "out")] == docs[:1]


# planted truth (../shared/data) ----------------------------------------------------------------


@pytest.mark.integration
def test_planted_truth_precision_and_recall(tmp_path):
    shared_file("raw/llamafactory_c4_demo.jsonl")
    spec = importlib.util.spec_from_file_location(
        "dataprep_planted", ROOT / "benchmarks" / "dataprep_planted.py"
    )
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)
    truth = planted.plant(tmp_path)
    prepare(planted.config(tmp_path, workers=2), quiet=True)
    scores = {(r["stage"], r["plant"]): r for r in planted.score(tmp_path / "prepared", truth)}
    # every plant is removed by some stage; the stage made for it is precise
    for stage, plant, precision in [
        ("language", "other_language", 0.75),  # langid also drops a few English lists/tables
        ("exact_dedup", "exact_duplicate", 1.0),
        ("blocklist", "blocklist", 1.0),
        ("decontaminate", "contaminated", 1.0),
    ]:
        row = scores[stage, plant]
        assert row["removed_by_any_stage"] == 1.0, row
        assert row["precision"] >= precision, row
    assert scores["gopher_repetition", "junk"]["removed_by_any_stage"] == 1.0
    assert scores["minhash_dedup", "near_duplicate @2% edits"]["recall"] >= 0.7
    pii = scores["pii", "pii values (kept docs)"]
    assert pii["recall"] == 1.0 and pii["precision"] >= 0.85, pii


# Slurm: the generated job chain (no cluster here: sbatch is replaced by a recorder) ------------


def test_slurm_jobs_are_generated_as_a_dependent_chain(tmp_path, raw_file, monkeypatch, capsys):
    import datatrove.executor.slurm as slurm

    submitted = []

    def fake_sbatch(script: str, _retriever, *args: str) -> str:
        submitted.append((script, args, str(101 + len(submitted))))
        return submitted[-1][2]

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_sbatch)
    cfg = run_config(
        [raw_file], tmp_path / "out", [dict(type="normalize"), dict(type="minhash_dedup")], tasks=3
    )
    cfg["run"].update(executor="slurm", slurm=dict(partition="cpu", cpus_per_task=2))
    assert prepare(cfg) is None
    jobs = [job for job in submitted if "launch_pickled_pipeline" in job[0]]
    merges = [s for s, _, _ in submitted if "merge_stats" in s]
    assert len(merges) == len(jobs)  # datatrove's per-run stats merge
    names = [s.split("--job-name=")[1].split("\n")[0] for s, _, _ in jobs]
    assert names == [f"xtuner_prepare_{n}" for n in ("to_1_minhash_dedup",
                     "1_minhash_dedup_signatures", "1_minhash_dedup_buckets",
                     "1_minhash_dedup_clusters", "output")]  # fmt: skip
    first = jobs[0][0]
    assert "#SBATCH --partition=cpu" in first and "#SBATCH --array=0-2" in first
    assert "#SBATCH --cpus-per-task=2" in first
    assert not any("--dependency" in a for a in jobs[0][1])
    for (_, _, before), (_, args, _) in zip(jobs, jobs[1:]):
        assert f"--dependency=afterok:{before}" in args
    assert "xtuner data report" in capsys.readouterr().out
    with pytest.raises(XtunerError, match="no output shards yet"):
        load_report(tmp_path / "out")


def test_slurm_needs_a_partition(tmp_path, raw_file):
    cfg = run_config([raw_file], tmp_path / "out", [])
    cfg["run"].update(executor="slurm", slurm=dict(tme="1:00:00"))
    text = config_problems(cfg)
    assert "run.slurm: unknown setting 'tme'; did you mean 'time'?" in text
    assert "run.slurm.partition" in text


# the output folder: nothing of the user's is ever deleted ---------------------------------------
def test_a_folder_we_did_not_write_is_refused_even_with_overwrite(tmp_path, raw_file):
    """A folder holding someone's manifest.json and data/ is not taken for our output."""
    out = tmp_path / "theirs"
    (out / "data").mkdir(parents=True)
    (out / "manifest.json").write_text('{"mine": true}')
    (out / "data" / "train-0000.jsonl").write_text('{"text": "precious"}\n')
    for overwrite in (False, True):
        with pytest.raises(XtunerError, match=r"not empty and was not written by .*no \.xtuner"):
            prepare(run_config([raw_file], out, [dict(type="normalize")]), overwrite=overwrite)
    assert (out / "data" / "train-0000.jsonl").read_text() == '{"text": "precious"}\n'
    assert (out / "manifest.json").read_text() == '{"mine": true}'


def test_an_output_holding_an_input_is_refused(tmp_path, raw_file):
    out = tmp_path / "out"
    prepare(run_config([raw_file], out, [dict(type="normalize")]), quiet=True)
    inside = out / "data" / "raw.jsonl"
    inside.write_text(raw_file.read_text())
    cfg = run_config([inside], out, [dict(type="normalize")])
    with pytest.raises(XtunerError, match=r"is or contains the input .*inputs.data_files\[0\]"):
        prepare(cfg, overwrite=True)
    assert inside.read_text() == raw_file.read_text()


def test_a_failing_rerun_keeps_the_earlier_output(tmp_path, raw_file):
    out = tmp_path / "out"
    prepare(run_config([raw_file], out, [dict(type="normalize")]), quiet=True)
    before = output_rows(out)
    with pytest.raises(XtunerError, match="holds an earlier .*--overwrite replaces it"):
        prepare(run_config([raw_file], out, [dict(type="normalize")]), quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(XtunerError, match="bad.jsonl, line 2"):
        prepare(run_config([bad], out, [dict(type="normalize")]), overwrite=True, quiet=True)
    assert output_rows(out) == before and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out", "raw.jsonl"]
    # a good rerun with --overwrite replaces it whole
    prepare(run_config([raw_file], out, [dict(type="normalize")], tasks=1), overwrite=True,
            quiet=True)  # fmt: skip
    assert sorted(p.name for p in (out / "data").iterdir()) == ["00000.jsonl"]
    assert json.loads((out / "_work" / "config.json").read_text())["output"] == str(out)


def test_nothing_kept_is_an_error_and_writes_nothing(tmp_path, raw_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(XtunerError, match=r"the inputs hold no document \(.*empty.jsonl\)"):
        prepare(run_config([empty], tmp_path / "o1", [dict(type="normalize")]), quiet=True)
    stages = [dict(type="normalize"), dict(type="language", languages=["de"])]
    with pytest.raises(XtunerError, match=r"no document survived: 16 read .*_language: 16"):
        prepare(run_config([raw_file], tmp_path / "o2", stages), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "raw.jsonl"]


def test_unknown_language_codes_are_refused_with_the_closest(raw_file):
    """``languages=["klingon"]`` was accepted and kept nothing."""
    text = config_problems(
        run_config([raw_file], "out", [dict(type="language", languages=["klingon", "eng", "en"])])
    )
    assert "stages[0] (language).languages: unknown language code 'klingon' (ISO 639-1" in text
    assert "unknown language code 'eng'; did you mean 'en'?" in text
