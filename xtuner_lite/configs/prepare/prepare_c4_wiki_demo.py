# `xtuner data prepare`: LLaMA-Factory's raw C4 and Wikipedia demos (../shared/data, not bundled:
# point inputs.data_files at a copy) → clean English text for incremental pretraining
# (train with map_fn="pretrain" on OUTPUT/data/*.jsonl).
inputs = dict(
    data_files=[
        "../shared/data/raw/llamafactory_c4_demo.jsonl",  # relative to the cwd
        "../shared/data/raw/llamafactory_wiki_demo.txt",  # one document per line
    ],
    kind="text",  # or "sft": rows kept as they are, judged by all their strings
    text_key="text",
)
stages = [
    dict(type="normalize"),  # NFKC, spaces
    dict(type="language", languages=["en"], min_score=0.65),  # langid.py, ships its model
    dict(type="gopher_repetition"),  # datatrove's filters, with their own settings
    dict(type="gopher_quality"),
    dict(type="pii"),  # e-mail, public IP, phone
    dict(type="blocklist", words=["viagra", "casino bonus"], max_hits=0),
    # any `xtuner eval` task, its files under data_root (as `xtuner eval --data-root`)
    dict(type="decontaminate", tasks=["gsm8k"], data_root="../shared/data/eval", ngram=13),
    dict(type="exact_dedup"),
    dict(type="minhash_dedup", ngram=5, buckets=14, hashes_per_bucket=8),
]
output = "work_dirs/prepared/c4_wiki_demo"
run = dict(tasks=4, workers=2, executor="local")
