# Qwen/Qwen2.5-7B-Instruct (hub id; any local folder works too).
pretrained_model = "Qwen/Qwen2.5-7B-Instruct"
template = "qwen2_5"
max_length = 2048

trust_remote_code = False

# Shapes from the model card's config.json: lets tests and the memory planner build the model
# on the meta device without weights or the hub.
architecture = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rope_theta=1000000.0,
)
# tokens per loss chunk on an 8 GB card: 128 MiB of fp32 logits over the 152,064-word vocabulary
loss_chunk_size = 192
