"""Flux attention through a processor of our own, so that the SDPA kernel, and the memory layout it needs, are ours
to choose (`speed.attention`).

Why: on the H200 (2026-12-01, issue 17) cuDNN's SDPA took 1.674 ms forward + backward for Flux-dev's attention at
1024 px against 3.195 ms for flash, but inside diffusers' Flux processor it crashed with an illegal memory access
(later `CUBLAS_STATUS_EXECUTION_FAILED`). It ran once q/k/v *and the gradient arriving at the attention output*
were contiguous: then one double and one single block took 16.1 against 19.0 ms per step with the same gradient
norm to 4 digits. This processor does exactly that: q/k/v in (B, H, S, D) contiguous, and `_ContiguousGrad` on
the output. It computes what diffusers' `FluxAttnProcessor` computes (projections, per-head RMS norms, the text
tokens first, rotary embeddings, SDPA, output projections); a CPU test checks that within float32 rounding.

`cudnn` enables cuDNN's SDPA for these calls, with flash, efficient and math still enabled as fallbacks. The list
enables backends; it does not order them. torch orders them itself, and its CUDA build puts cuDNN first on sm90/sm100
when cuDNN is newer than 9.15 (`check_prefer_cudnn_attention` in aten's cuda/sdp_utils.cpp: older cuDNN mishandled
sequence lengths not divisible by 128). The H200 had cuDNN 9.19. With an older cuDNN, torch puts flash first, so
`cudnn` then runs flash through this processor.

`auto` picks `cudnn` where it was measured on the H200 (2026-12-01): FLUX.1 transformers (dev, schnell, Kontext) on
Hopper (compute capability 9.x), without gradient checkpointing or block swapping. There, over 4 steps the loss and LoRA
gradients match the flash path within bf16 tolerance (tests/perf/test_attention_gpu.py, eager), and a whole
compiled step with CUDA graphs took 0.3742 s against 0.4436 at 1024 px and 0.1293 against 0.1433 at 512 px
(bench/speed.py). Elsewhere `auto` keeps diffusers' processor: other GPUs, the tiers' checkpointed and swapped
blocks, and Chroma (its T5 mask goes into every attention) were not run with cuDNN; `cudnn` asks for it anyway.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

ATTENTION = ("auto", "default", "cudnn")
_BACKENDS = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH]}


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on the incoming gradient made contiguous (cuDNN's SDPA backward reads it
    with the forward output's strides: a transposed gradient from the output projection crashed it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class FluxSdpaProcessor:
    """A `FluxAttention` processor that runs SDPA with `backends`, its inputs and output gradient contiguous."""

    def __init__(self, backends: list[SDPBackend]) -> None:
        self.backends = list(backends)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        from diffusers.models.embeddings import apply_rotary_emb

        q, k, v = (self._heads(attn, p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:  # double blocks: the text tokens go first, as in diffusers' processor and BFL's
            cq, ck, cv = (self._heads(attn, p(encoder_hidden_states))
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = torch.cat([attn.norm_added_q(cq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ck), k], dim=1)
            v = torch.cat([cv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D), dense
        with sdpa_kernel(self.backends):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = _ContiguousGrad.apply(out).transpose(1, 2).flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())

    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, attn.head_dim))


def resolve_attention(choice: str, transformer: torch.nn.Module, device: torch.device | str | None,
                      checkpointing: bool = False, swapping: bool = False) -> str:
    """`speed.attention` with `auto` decided for `transformer` on `device`: `cudnn` for a FLUX.1 transformer on a
    Hopper GPU without gradient checkpointing or block swapping (what was measured, see the module docstring),
    `default` otherwise."""
    if choice not in ATTENTION:
        raise ValueError(f"speed.attention={choice!r} is not one of {ATTENTION}")
    if choice != "auto":
        return choice
    from diffusers import FluxTransformer2DModel

    if device is None or torch.device(device).type != "cuda" or type(transformer) is not FluxTransformer2DModel \
            or checkpointing or swapping:
        return "default"
    return "cudnn" if torch.cuda.get_device_capability(torch.device(device))[0] == 9 else "default"


def use_attention(transformer: torch.nn.Module, choice: str, device: torch.device | str | None,
                  checkpointing: bool = False, swapping: bool = False) -> int:
    """Install our processor on every attention module that runs diffusers' plain Flux processor (`choice`:
    `speed.attention`, `auto` decided by `resolve_attention`); returns how many. `default` keeps diffusers'
    processor; modules with fused projections or another processor are left as they are."""
    choice = resolve_attention(choice, transformer, device, checkpointing, swapping)
    if choice == "default":
        return 0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    if device is None or torch.device(device).type != "cuda":
        log.info("speed.attention=%s: SDPA picks its own kernel on the CPU (cuDNN and flash are CUDA kernels)", choice)
    mods = [m for m in transformer.modules() if isinstance(m, FluxAttention)
            and type(m.processor) is FluxAttnProcessor and not getattr(m, "fused_projections", False)]
    for m in mods:
        m.set_processor(FluxSdpaProcessor(_BACKENDS[choice]))
    log.info("attention: %d modules run fluxlora's processor, SDPA backends %s enabled (torch orders them: cuDNN "
             "first on Hopper/Blackwell with cuDNN > 9.15)", len(mods), ", ".join(b.name for b in _BACKENDS[choice]))
    return len(mods)
