# meta-llama/Llama-3.1-8B-Instruct (hub id; any local folder works too).
pretrained_model = "meta-llama/Llama-3.1-8B-Instruct"
template = "llama3_1_chat"
max_length = 2048

trust_remote_code = False

# Shapes from the model card's config.json: lets tests and the memory planner build the model
# on the meta device without weights or the hub.
architecture = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    max_position_embeddings=131072,
)
# tokens per loss chunk on an 8 GB card: 128 MiB of fp32 logits over the 128,256-word vocabulary
loss_chunk_size = 256
