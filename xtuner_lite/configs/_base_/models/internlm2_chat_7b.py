# internlm/internlm2-chat-7b (hub id; any local folder works too). Its modelling code is remote
# (trust_remote_code); its shapes are Llama's with a fused wqkv.
pretrained_model = "internlm/internlm2-chat-7b"
template = "internlm2_chat"
max_length = 2048

trust_remote_code = True

# Shapes from the model card's config.json: lets tests and the memory planner build the model
# on the meta device without weights or the hub.
architecture = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=92544,
    rope_theta=1000000.0,
)
# tokens per loss chunk on an 8 GB card: 128 MiB of fp32 logits over the 92,544-word vocabulary
loss_chunk_size = 352
