# internlm/internlm2_5-7b-chat: InternLM2's architecture and chat template, with its own weights
# and a larger RoPE base. Remote modelling code (trust_remote_code), as for InternLM2.
from mmengine.config import read_base

with read_base():
    from .internlm2_chat_7b import *  # noqa: F403

pretrained_model = "internlm/internlm2_5-7b-chat"
architecture.update(rope_theta=50000000.0)  # noqa: F405
