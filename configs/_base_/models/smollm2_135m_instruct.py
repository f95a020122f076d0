# SmolLM2-135M-Instruct, the embedded default: downloaded and converted on first use.
pretrained_model = "smollm2-135m-instruct"
template = "smollm2"  # chatml with SmolLM2's default system prompt
max_length = 2048
