"""Flux attention through a processor of our own, so that the SDPA kernel, and the memory layout it needs, are ours
to choose (`speed.attention`).

Why: on the H200 (2026-12-01, issue 17) cuDNN's SDPA took 1.674 ms forward + backward for Flux-dev's attention at
1024 px against 3.195 ms for flash, but inside diffusers' Flux processor it crashed with an illegal memory access
(later `CUBLAS_STATUS_EXECUTION_FAILED`). It ran once q/k/v *and the gradient arriving at the attention output*
were contiguous: then one double and one single block took 16.1 against 19.0 ms per step with the same gradient
norm to 4 digits. This processor does exactly that: q/k/v in (B, H, S, D) contiguous, and `_ContiguousGrad` on
the output. It computes what diffusers' `FluxAttnProcessor` computes (projections, per-head RMS norms, the text
tokens first, rotary embeddings, SDPA, output projections); a CPU test checks that within float32 rounding.

`cudnn` enables cuDNN's SDPA while the transformer runs, with flash, efficient and math still enabled as fallbacks
(`SdpaScope`, a pre/post hook pair on the transformer). The list enables backends; it does not order them. torch
orders them itself, and its CUDA build puts cuDNN first on sm90/sm100 when cuDNN is newer than 9.15
(`check_prefer_cudnn_attention` in aten's cuda/sdp_utils.cpp: older cuDNN mishandled sequence lengths not divisible
by 128). The H200 had cuDNN 9.19. With an older cuDNN, torch puts flash first, so
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
import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

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


_SWITCHES = {SDPBackend.CUDNN_ATTENTION: (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
             SDPBackend.FLASH_ATTENTION: (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
             SDPBackend.EFFICIENT_ATTENTION: (torch.backends.cuda.mem_efficient_sdp_enabled,
                                              torch.backends.cuda.enable_mem_efficient_sdp),
             SDPBackend.MATH: (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp)}


class SdpaScope:
    """Enables a set of SDPA backends while any thread is inside a transformer call, and puts back the flags it
    found when the last one leaves.

    Why not `sdpa_kernel` in the processor: torch.compile traces that context into each block's graph, and
    AOTAutograd then bypasses its cache for the graph ("Unsupported call_function target `_backend_from_string`",
    two processes sharing one cache dir on the CPU, 2026-12-02), so every warm start re-partitioned and re-lowered
    the joint graphs. Set outside the compiled blocks, the flags are read where they matter: when a block is traced
    (the trace picks the SDPA op) and when an eager call dispatches. A backward runs the backward of the op its
    forward ran, whatever the flags then. On the H200 cuDNN's ops still ran in compiled blocks
    (tests/perf/test_attention_gpu.py), and a warm run without a tier reached its third bucket shape in 11.4–14.1 s
    against 18.4 s before (README "GPU benchmarks on the H200").

    The flags are process-wide (ATen's global context), and a sampling thread may run the transformer while the
    training step does: a count under a lock makes the first to enter save the flags and the last to leave
    restore them, where nested `sdpa_kernel` contexts would leave them to whichever thread left last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: dict[SDPBackend, bool] = {}

    def enter(self, backends: list[SDPBackend]) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = {b: enabled() for b, (enabled, _) in _SWITCHES.items()}
                for b, (_, enable) in _SWITCHES.items():
                    enable(b in backends)
            self._inside += 1

    def leave(self) -> None:
        with self._lock:
            if self._inside == 0:  # a post hook whose pre hook never ran (a hook before ours raised)
                return
            self._inside -= 1
            if self._inside == 0:
                for b, (_, enable) in _SWITCHES.items():
                    enable(self._saved[b])

    @property
    def active(self) -> bool:
        return self._inside > 0


SDPA_SCOPE = SdpaScope()
"""The one scope of this process: the flags it guards are process-wide too."""


def scope_transformer(transformer: torch.nn.Module, backends: list[SDPBackend]) -> None:
    """Enable `backends` for every call of `transformer` (forward pre hook; a post hook that also runs when the
    forward raises)."""
    transformer.register_forward_pre_hook(lambda module, args: SDPA_SCOPE.enter(backends))
    transformer.register_forward_hook(lambda module, args, out: SDPA_SCOPE.leave(), always_call=True)


class FluxSdpaProcessor:
    """A `FluxAttention` processor that runs SDPA on contiguous q/k/v with a contiguous output gradient; which
    backends SDPA may pick is set around the transformer's call (`scope_transformer`)."""

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
        m.set_processor(FluxSdpaProcessor())
    if mods:
        scope_transformer(transformer, _BACKENDS[choice])
    log.info("attention: %d modules run fluxlora's processor, SDPA backends %s enabled (torch orders them: cuDNN "
             "first on Hopper/Blackwell with cuDNN > 9.15)", len(mods), ", ".join(b.name for b in _BACKENDS[choice]))
    return len(mods)
