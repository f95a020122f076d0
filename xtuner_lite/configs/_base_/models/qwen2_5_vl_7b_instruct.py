# Qwen/Qwen2.5-VL-7B-Instruct (hub id; any local folder works too): a 632M-parameter ViT whose
# patch merger (2×2 patches per token) is the projector, and a Qwen2.5-7B language model with
# rotary positions on each image's patch grid. An image's tokens follow its size: the data's
# image_max_pixels bounds it (about 256 tokens at 448×448).
from mmengine.config import read_base

with read_base():
    from .qwen2_5_7b_instruct import *  # noqa: F403

pretrained_model = "Qwen/Qwen2.5-VL-7B-Instruct"
max_length = 1024  # two images of 448×448 (256 tokens each) and their conversation
image_max_pixels = 448 * 448

# the model card's config.json shapes (its language model is Qwen2.5-7B's, its rotary
# positions in three sections): the memory planner and tests need no weights
architecture = dict(
    model_type="qwen2_5_vl",
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    text_config={
        **{k: v for k, v in architecture.items() if k not in ("model_type", "rope_theta")},  # noqa: F405
        "model_type": "qwen2_5_vl_text",
        "rope_parameters": dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
    },
    image_token_id=151655,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=False,
)
# tokens per loss chunk on an 8 GB card: 74 MiB of fp32 logits over the 152,064-word vocabulary
loss_chunk_size = 128
