"""Precision and recall of each `xtuner data prepare` stage against planted truth.

A seeded script builds one JSONL file from real text (LLaMA-Factory's C4 and Wikipedia demos,
Chinese rows of its Alpaca zh demo, GSM8K test questions) with known plants: exact duplicates
(whitespace changed, so normalization has to happen first), near-duplicates at several word-edit
rates, Chinese documents, injected e-mail / IP / phone PII, boilerplate and junk documents,
block-listed words, and GSM8K test questions pasted into web text. The bundled pipeline runs on
it, and each stage's removals are scored against its plant. Original web documents a filter
removes count as false positives here, although some are real junk (and real PII masked in them
counts against the PII stage's precision, although it is real PII).

    python benchmarks/dataprep_planted.py [--workers 2] [--out /tmp/planted]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EDIT_RATES = (0.02, 0.05, 0.1, 0.2)
BLOCKED = ["casino bonus", "viagra"]
PII_KINDS = ("email", "ip", "phone")


def _sources(shared: Path) -> tuple[list[str], list[str], list[str]]:
    c4 = [json.loads(x)["text"] for x in (shared / "raw/llamafactory_c4_demo.jsonl").open()]
    wiki = [x.strip() for x in (shared / "raw/llamafactory_wiki_demo.txt").open() if x.strip()]
    zh_rows = json.loads((shared / "sft/llamafactory_alpaca_zh_demo.json").read_text())
    zh = ["\n".join(r[k] for k in ("instruction", "input", "output") if r[k]) for r in zh_rows]
    gsm = [json.loads(x)["question"] for x in (shared / "eval/gsm8k_test.jsonl").open()]
    return c4 + wiki, zh, gsm


def _edit(text: str, rate: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * rate))):
        words[i] = rng.choice(["alpha", "river", "quietly", "seven", "blue", "market", "the"])
    return " ".join(words)


def _pii(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(PII_KINDS)
    n = rng.randrange(10**6)
    if kind == "email":
        return kind, f"jane.doe{n}@mailhost{n % 97}.com"
    if kind == "ip":
        return kind, ".".join(str(rng.randrange(11, 99 if i == 0 else 250)) for i in range(4))
    return kind, f"+1 415 {rng.randrange(200, 999)} {rng.randrange(1000, 9999)}"


def _junk(rng: random.Random, i: int) -> str:
    kind = i % 3
    if kind == 0:  # boilerplate repeated
        return "\n".join(["Click here to subscribe to our newsletter!"] * 40)
    if kind == 1:  # symbols and numbers
        symbols = ["$$$", "###", "!!!", "123", "@@", ">>>", "***"]
        return " ".join(rng.choice(symbols) for _ in range(300))
    return "buy now " * 5  # too short


def plant(out: Path, shared: Path = SHARED, seed: int = 0) -> dict[int, dict]:
    """Write ``out/planted.jsonl``; return {line number: plant} (line numbers from 1)."""
    rng = random.Random(seed)
    english, zh, gsm = _sources(shared)
    english = [t for t in english if len(t.split()) >= 120]
    rng.shuffle(english)
    base, pool = english[:170], english[170:]  # the rest: PII, block-list, eval plants
    rows: list[tuple[str, dict]] = [(t, {"kind": "original"}) for t in base]
    for i in rng.sample(range(len(base)), 20):  # "of": the original's line
        rows.append((base[i].replace(". ", ".  ") + "\n", {"kind": "exact_duplicate", "of": i + 1}))
    for rate in EDIT_RATES:
        for i in rng.sample(range(len(base)), 10):
            rows.append((_edit(base[i], rate, rng),
                         {"kind": "near_duplicate", "rate": rate, "of": i + 1}))  # fmt: skip
    for t in rng.sample(zh, 20):
        rows.append((t, {"kind": "other_language"}))
    for t in pool[:20]:
        found = [_pii(rng) for _ in range(rng.randrange(1, 4))]
        words = t.split(" ")
        for _, value in found:
            words.insert(rng.randrange(len(words)), f"contact {value} today")
        rows.append(
            (
                " ".join(words),
                {"kind": "pii", "values": [v for _, v in found], "kinds": [k for k, _ in found]},
            )
        )
    for i in range(15):
        rows.append((_junk(rng, i), {"kind": "junk"}))
    for t in pool[20:30]:
        words = t.split(" ")
        words.insert(len(words) // 2, rng.choice(BLOCKED))
        rows.append((" ".join(words), {"kind": "blocklist"}))
    for t in pool[30:45]:
        rows.append((t + "\n\n" + rng.choice(gsm), {"kind": "contaminated"}))
    order = list(range(len(base), len(rows)))
    rng.shuffle(order)
    rows = rows[: len(base)] + [rows[i] for i in order]  # originals first: dedup keeps them
    out.mkdir(parents=True, exist_ok=True)
    with (out / "planted.jsonl").open("w") as f:
        for text, _ in rows:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return {i + 1: p for i, (_, p) in enumerate(rows)}


def config(out: Path, workers: int) -> dict:
    return dict(
        inputs=dict(data_files=[str(out / "planted.jsonl")], kind="text"),
        stages=[
            dict(type="normalize"),
            dict(type="language", languages=["en"]),
            dict(type="gopher_repetition"),
            dict(type="gopher_quality"),
            dict(type="pii"),
            dict(type="blocklist", words=BLOCKED),
            dict(type="decontaminate", files=[str(SHARED / "eval/gsm8k_test.jsonl")], ngram=8),
            dict(type="exact_dedup"),
            dict(type="minhash_dedup"),
        ],
        output=str(out / "prepared"),
        run=dict(tasks=4, workers=workers),
    )


STAGE_PLANT = {  # the plant each stage is scored against
    "language": "other_language",
    "gopher_repetition": "junk",
    "gopher_quality": "junk",
    "blocklist": "blocklist",
    "decontaminate": "contaminated",
    "exact_dedup": "exact_duplicate",
    "minhash_dedup": "near_duplicate",
}


def _line(source: str) -> int:
    return int(source.rsplit(" ", 1)[-1])


def score(prepared: Path, truth: dict[int, dict]) -> list[dict]:
    """Per stage: removed, true positives, precision, recall against its plant."""
    removed_by: dict[str, set[int]] = {}
    for folder in sorted((prepared / "removed").iterdir()):
        stage = folder.name.split("_", 1)[1]
        lines = set()
        for path in folder.glob("*.jsonl"):
            lines |= {_line(json.loads(x)["metadata"]["source"]) for x in path.open()}
        removed_by[stage] = lines
    anywhere = set().union(*removed_by.values()) if removed_by else set()
    rows = []
    for stage, kind in STAGE_PLANT.items():
        if stage in ("exact_dedup", "minhash_dedup"):
            rows.append(_dedup_score(stage, kind, removed_by.get(stage, set()), truth, anywhere))
            continue
        planted = {n for n, p in truth.items() if p["kind"] == kind}
        got = removed_by.get(stage, set())
        tp = len(got & planted)
        rows.append(
            {
                "stage": stage,
                "plant": kind,
                "planted": len(planted),
                "removed": len(got),
                "precision": tp / len(got) if got else float("nan"),
                "recall": tp / len(planted) if planted else float("nan"),
                "removed_by_any_stage": len(planted & anywhere) / len(planted) if planted else 0.0,
            }
        )
    for rate in EDIT_RATES:
        at_rate = {n: p for n, p in truth.items() if p.get("rate") == rate}
        near = removed_by.get("minhash_dedup", set())
        row = _dedup_score("minhash_dedup", "near_duplicate", near, at_rate, anywhere)
        caught = round(row["recall"] * row["planted"])
        rows.append({**row, "plant": f"near_duplicate @{rate:.0%} edits", "removed": caught,
                     "precision": float("nan")})  # fmt: skip
    rows.append(_pii_score(prepared, truth))
    return rows


def _dedup_score(
    stage: str, kind: str, removed: set[int], truth: dict[int, dict], anywhere: set[int]
) -> dict:
    """A planted (copy, original) pair is caught when the stage removed either one (datatrove
    keeps whichever its clustering puts first); a removal is right when it is one of a pair."""
    pairs = [(n, p["of"]) for n, p in truth.items() if p["kind"] == kind]
    members = {n for pair in pairs for n in pair}
    caught = sum(1 for pair in pairs if removed & set(pair))
    return {"stage": stage, "plant": kind, "planted": len(pairs), "removed": len(removed),
            "precision": len(removed & members) / len(removed) if removed else float("nan"),
            "recall": caught / len(pairs) if pairs else float("nan"),
            "removed_by_any_stage": sum(1 for pair in pairs if anywhere & set(pair)) / len(pairs)
            if pairs else 0.0}  # fmt: skip


def _pii_score(prepared: Path, truth: dict[int, dict]) -> dict:
    """Recall: planted values gone from the kept text; precision: masks that hit a plant."""
    kept = {}
    for path in (prepared / "_work" / "kept").glob("*.jsonl"):
        for x in path.open():
            doc = json.loads(x)
            kept[_line(doc["metadata"]["source"])] = doc
    planted = masked_planted = masks = 0
    for line, doc in kept.items():
        counts = Counter(doc["metadata"].get("pii", {}))
        masks += sum(counts.values())
        values = truth[line].get("values", [])
        planted += len(values)
        masked_planted += sum(1 for v in values if v not in doc["text"])
    return {
        "stage": "pii",
        "plant": "pii values (kept docs)",
        "planted": planted,
        "removed": masks,
        "precision": masked_planted / masks if masks else float("nan"),
        "recall": masked_planted / planted if planted else float("nan"),
        "removed_by_any_stage": float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/xtuner_planted"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads the shared datasets")
    from xtuner_lite.dataprep import prepare

    truth = plant(opts.out, seed=opts.seed)
    report = prepare(config(opts.out, opts.workers), overwrite=True)
    print(
        f"\n{'stage':18s} {'plant':28s} {'planted':>7s} {'removed':>7s} {'precision':>9s} "
        f"{'recall':>7s} {'by any stage':>12s}"
    )
    for r in score(opts.out / "prepared", truth):
        print(
            f"{r['stage']:18s} {r['plant']:28s} {r['planted']:7d} {r['removed']:7d} "
            f"{r['precision']:9.2f} {r['recall']:7.2f} {r['removed_by_any_stage']:12.2f}"
        )
    print(f"{report['documents_per_second']} documents/s, {report['mb_per_second']} MB/s")


if __name__ == "__main__":
    main()
