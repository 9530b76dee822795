"""SD3 prompt encoding: the one function the cache and validation both use.

    CLIP-L, CLIP-G: 77 tokens, penultimate hidden state; concat on features (768+1280) and zero-pad to T5's width
    T5-XXL: L tokens (77 or 154), last hidden state; `zero` padding mode multiplies it by the attention mask
    prompt_embeds = cat([clip_padded, t5], dim=seq) -> (B, 77 + L, D_t5);  pooled = cat(pooled_L, pooled_G) -> (B, P)
Equal to diffusers' StableDiffusion3Pipeline.encode_prompt (tests/test_text.py) for the `unmodified` mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytune_sd3.models.loading import TextEncoders

CLIP_TOKENS = 77


@torch.no_grad()
def encode_prompts(
    enc: TextEncoders, prompts: list[str], t5_max_length: int = 154, t5_padding: str = "unmodified"
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (prompt_embeds (B, 77 + t5_max_length, D_t5), pooled (B, P)) in the encoders' dtype/device."""
    device = enc.device
    clip_hidden, pooled = [], []
    for tok, model in zip(enc.tokenizers[:2], enc.encoders[:2], strict=True):
        ids = tok(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt").input_ids
        out = model(ids.to(device), output_hidden_states=True)
        pooled.append(out.text_embeds)
        clip_hidden.append(out.hidden_states[-2])
    t5_tok, t5 = enc.tokenizers[2], enc.encoders[2]
    t5_in = t5_tok(prompts, padding="max_length", max_length=t5_max_length, truncation=True, add_special_tokens=True,
                   return_tensors="pt")
    t5_out = t5(t5_in.input_ids.to(device))[0]
    if t5_padding == "zero":
        t5_out = t5_out * t5_in.attention_mask.to(device, t5_out.dtype).unsqueeze(-1)
    clip = torch.cat(clip_hidden, dim=-1)
    clip = F.pad(clip, (0, t5_out.shape[-1] - clip.shape[-1])).to(t5_out.dtype)
    return torch.cat([clip, t5_out], dim=-2), torch.cat(pooled, dim=-1).to(t5_out.dtype)
