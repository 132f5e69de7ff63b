"""The embedded default: a tiny random-weight Flux with offline tokenizers, built from configs.

Every part is built under a fixed seed, so the same base model comes back on every run and resume.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

# Words the synthetic captions use get whole-word T5 pieces; anything else falls back to characters.
_T5_WORDS = (
    "a an the of on in with and photo picture image red green blue yellow purple orange white black "
    "circle square triangle stripes dot background small large sks ohwx style"
).split()

TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
    latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0, scaling_factor=1.0, sample_size=64,
)
SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-to-printable-character table (the vocabulary a merge-free BPE needs)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(max_length: int) -> T5Tokenizer:
    """A unigram T5 tokenizer over a fixed word list plus single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in _T5_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build(seed: int = 0, t5_max_length: int = 32) -> dict:
    """Build every component of the tiny Flux; returns the dict FluxPipeline takes."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        tok = clip_tokenizer()
        tok2 = t5_tokenizer(t5_max_length)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1,
        ))
        vae = AutoencoderKL(**VAE)
        transformer = FluxTransformer2DModel(**TRANSFORMER)
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (clip, t5, vae, transformer):
        m.eval()  # models built from a config start in train mode; T5 dropout would randomise embeddings
    return dict(
        transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
        tokenizer_2=tok2, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )
