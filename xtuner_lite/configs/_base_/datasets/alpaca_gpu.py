# Alpaca-style data for 7B configs: point data_files at your copy (json/jsonl/csv/parquet/hub id).
train_dataset = dict(
    data_files="data/alpaca_data.json",
    map_fn="alpaca",
    max_length=2048,
    pack=True,
)
