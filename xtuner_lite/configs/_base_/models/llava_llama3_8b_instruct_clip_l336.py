# LLaVA-style Llama-3-8B-Instruct + CLIP ViT-L/14-336 + an MLP projector (XTuner's LLaVA-Llama-3):
# a folder written by xtuner_lite.model.vlm.compose_llava("meta-llama/Meta-Llama-3-8B-Instruct",
#     None, OUT, vision_model="openai/clip-vit-large-patch14-336")
# and trained through stage 1 (the projector; docs/vision.md). A standard
# LlavaForConditionalGeneration folder: any such folder works too.
from mmengine.config import read_base

with read_base():
    from .clip_vit_l336 import *  # noqa: F403
    from .llama3_8b_instruct import *  # noqa: F403

pretrained_model = "work_dirs/llava_llama3_8b_instruct_clip_l336"
max_length = 1280  # two images (577 tokens each) and a short conversation, or one and more text

# the two model cards' shapes: the memory planner and tests need no weights
architecture = dict(
    model_type="llava",
    image_seq_length=clip_vit_l336_tokens,  # noqa: F405
    vision_feature_select_strategy="full",  # compose_llava keeps every feature
    vision_config=clip_vit_l336,  # noqa: F405
    text_config=architecture,  # noqa: F405
)
# tokens per loss chunk on an 8 GB card: 47 MiB of fp32 logits over the 128,256-word vocabulary
# (the frozen vision tower takes the room of the text recipe's larger chunk)
loss_chunk_size = 96
