# Preference pairs for 7B configs: point data_files at your copy (ShareGPT, OpenAI or Alpaca
# preference rows; json/jsonl/csv/parquet/hub id).
train_dataset = dict(
    data_files="data/dpo_pairs.json",
    map_fn="auto",
    max_length=2048,  # per sequence; a packed row holds both sequences of its pairs
    pack=True,
)
