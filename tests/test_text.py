"""Our prompt encoding equals diffusers' StableDiffusion3Pipeline.encode_prompt on the tiny pipeline."""

import pytest
import torch

from raytune_sd3.models.loading import TextEncoders, check_tokenizer, load_text_encoders
from raytune_sd3.models.text import encode_prompts

PROMPTS = ["a red circle on a white background", "", "a photo of a small blue square, studio lighting " * 6]


@pytest.fixture(scope="module")
def encoders(tiny_sd3) -> TextEncoders:
    return load_text_encoders(tiny_sd3)


@pytest.mark.parametrize("t5_len", [77, 154])
def test_equals_pipeline_encode_prompt(tiny_pipe, encoders, t5_len):
    ours, ours_pooled = encode_prompts(encoders, PROMPTS, t5_max_length=t5_len)  # loaded by our loader
    with torch.no_grad():  # as the pipeline's __call__ runs it (grad mode picks other fp32 kernels)
        ref, _, ref_pooled, _ = tiny_pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS,
                                                        do_classifier_free_guidance=False, max_sequence_length=t5_len)
    assert ours.shape == (3, 77 + t5_len, 96) and ours_pooled.shape == (3, 80)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours_pooled, ref_pooled, rtol=0, atol=0)


def test_zero_padding_masks_t5_padding(encoders):
    plain, _ = encode_prompts(encoders, ["a red circle"], 77, "unmodified")
    zero, _ = encode_prompts(encoders, ["a red circle"], 77, "zero")
    n_tokens = int(encoders.tokenizers[2]("a red circle").attention_mask.__len__())
    t5_plain, t5_zero = plain[0, 77:], zero[0, 77:]
    torch.testing.assert_close(t5_zero[:n_tokens], t5_plain[:n_tokens])
    assert t5_zero[n_tokens:].abs().sum() == 0 and t5_plain[n_tokens:].abs().sum() > 0
    torch.testing.assert_close(zero[0, :77], plain[0, :77])  # CLIP part untouched


def test_a_tokenizer_too_small_for_its_encoder_is_refused(encoders):
    from transformers import CLIPTokenizer

    broken = CLIPTokenizer()  # what an offline hub load without tokenizer files can silently give
    with pytest.raises(RuntimeError, match="tokenizer has 2 tokens but its text encoder expects 716"):
        check_tokenizer(broken, encoders.encoders[0], "tokenizer")
