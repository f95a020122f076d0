# CLIP ViT-L/14 at 336 pixels (openai/clip-vit-large-patch14-336, LLaVA-1.5's encoder): the
# vision config of a LLaVA composed with it (xtuner_lite.model.vlm.compose_llava).
clip_vit_l336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)
clip_vit_l336_tokens = 577  # 24 × 24 patches and the class token: every feature is kept
