# LLaVA-style Qwen2.5-7B-Instruct + CLIP ViT-L/14-336 + an MLP projector (XTuner's LLaVA line):
# a folder written by xtuner_lite.model.vlm.compose_llava(
#     "Qwen/Qwen2.5-7B-Instruct", None, OUT, vision_model="openai/clip-vit-large-patch14-336")
# and trained through stage 1 (the projector; docs/vision.md). A standard
# LlavaForConditionalGeneration folder: any such folder works too.
pretrained_model = "work_dirs/llava_qwen2_5_7b_clip_l336"
template = "qwen2_5"
max_length = 1536  # two images (577 tokens each) and their conversation

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
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
    ),
)
# tokens per loss chunk on an 8 GB card: 74 MiB of fp32 logits over the 152,064-word vocabulary
# (the frozen vision tower takes the room of the text recipe's larger chunk)
loss_chunk_size = 128
