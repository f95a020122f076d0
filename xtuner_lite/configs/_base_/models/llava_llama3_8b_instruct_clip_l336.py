# LLaVA-style Llama-3-8B-Instruct + CLIP ViT-L/14-336 + an MLP projector (XTuner's LLaVA-Llama-3):
# a folder written by xtuner_lite.model.vlm.compose_llava("meta-llama/Meta-Llama-3-8B-Instruct",
#     None, OUT, vision_model="openai/clip-vit-large-patch14-336")
# and trained through stage 1 (the projector; docs/vision.md). A standard
# LlavaForConditionalGeneration folder: any such folder works too.
pretrained_model = "work_dirs/llava_llama3_8b_instruct_clip_l336"
template = "llama3_chat"
max_length = 1280  # two images (577 tokens each) and a short conversation, or one and more text

trust_remote_code = False

# Shapes (the two model cards' config.json): the memory planner and tests need no weights.
architecture = dict(
    model_type="llava",
    image_seq_length=577,  # 24 × 24 patches and the class token: every feature is kept
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
    text_config=dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
)
# tokens per loss chunk on an 8 GB card: 47 MiB of fp32 logits over the 128,256-word vocabulary
# (the frozen vision tower takes the room of the text recipe's larger chunk)
loss_chunk_size = 96
