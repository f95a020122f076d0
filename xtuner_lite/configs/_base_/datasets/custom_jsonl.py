# Your own chat data: one JSON object per line, {"messages": [{"role": ..., "content": ...}]},
# optional per-message "loss": false to leave an assistant turn untrained.
train_dataset = dict(
    data_files="data/my_chats.jsonl",
    map_fn="openai",
    max_length=2048,
    pack=True,
)
