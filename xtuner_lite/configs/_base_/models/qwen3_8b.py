# Qwen/Qwen3-8B (hub id; any local folder works too). Trained and chatted in its non-thinking
# mode (the "qwen3" template: an empty think block opens every reply).
pretrained_model = "Qwen/Qwen3-8B"
template = "qwen3"
max_length = 2048

trust_remote_code = False

# Shapes from the model card's config.json: lets tests and the memory planner build the model
# on the meta device without weights or the hub.
architecture = dict(
    model_type="qwen3",
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    rope_theta=1000000.0,
)
# tokens per loss chunk on an 8 GB card: 128 MiB of fp32 logits over the 151,936-word vocabulary
loss_chunk_size = 192
