# LLaVA-style Qwen2.5-7B-Instruct + CLIP ViT-L/14-336 + an MLP projector (XTuner's LLaVA line):
# a folder written by xtuner_lite.model.vlm.compose_llava(
#     "Qwen/Qwen2.5-7B-Instruct", None, OUT, vision_model="openai/clip-vit-large-patch14-336")
# and trained through stage 1 (the projector; docs/vision.md). A standard
# LlavaForConditionalGeneration folder: any such folder works too.
from mmengine.config import read_base

with read_base():
    from .clip_vit_l336 import *  # noqa: F403
    from .qwen2_5_7b_instruct import *  # noqa: F403

pretrained_model = "work_dirs/llava_qwen2_5_7b_clip_l336"
max_length = 1536  # two images (577 tokens each) and their conversation

# the two model cards' shapes: the memory planner and tests need no weights
architecture = dict(
    model_type="llava",
    image_seq_length=clip_vit_l336_tokens,  # noqa: F405
    vision_feature_select_strategy="full",  # compose_llava keeps every feature
    vision_config=clip_vit_l336,  # noqa: F405
    text_config=architecture,  # noqa: F405
)
# tokens per loss chunk on an 8 GB card: 74 MiB of fp32 logits over the 152,064-word vocabulary
# (the frozen vision tower takes the room of the text recipe's larger chunk)
loss_chunk_size = 128
