# Your own image conversations, LLaVA's shape, one JSON object per line:
# {"image": "images/0001.jpg", "conversations": [{"from": "human", "value": "<image>\n..."},
#  {"from": "gpt", "value": "..."}]}; image paths relative to the file (docs/vision.md).
train_dataset = dict(
    data_files="data/my_llava.jsonl",
    max_length=2048,
    pack=True,
)
objective = dict(type="vlm_sft")
