"""LoKr and LoHa Linears that apply their update to the activations, without peft's per-call full-size ΔW and
without peft's data-dependent module-dropout branch.

peft's `LoKrLayer.forward` / `LoHaLayer.forward` (0.21) do two things that cost memory on full-size Flux:

- in training they test `torch.rand(1) > module_dropout` for every layer, even with `module_dropout=0`: a
  data-dependent branch, so torch.compile breaks the block's graph at every adapted Linear (14 breaks in one Flux
  single block). With checkpointing inside the compiled blocks (`fluxlora.perf.speed`, activation budget 0 and no
  torch.utils.checkpoint) each graph fragment saves its own inputs, so the activations of every block stay alive
  until backward, and the 24gb tier's first LoKr step ran out of memory on the H200. Measured on the CPU (full-size
  blocks, 512 px, compiled as that tier compiles them): 0.313 GB saved for backward with one double + one single
  block against LoRA's 0.030 GB, then 0.161 GB per further double block and 0.142 GB per single block against
  LoRA's 0.010 GB: ~8.5 GB against ~0.6 GB over FLUX.1-dev's 19 + 38 blocks;
- `_get_delta_activations` builds the full out × in ΔW (kron(w1, w2), or (w1a·w1b) ∘ (w2a·w2b)) in the adapter's
  float32 for every call, and again in backward: 226 MB for a modulation Linear of Flux (18432 × 3072).

The classes here replace only `forward` / `_get_delta_activations` of fluxlora's layers (`use_activation_forward`
swaps the class of each peft LoKr/LoHa Linear after injection; parameters, names, `get_delta_weight`, merging and
every file format stay peft's). Same math as peft, in another order:

- LoKr: ΔW = s·kron(w1, w2), w1 (a × c), w2 (b × d), out = a·b, in = c·d. With x viewed as (N, c, d),
  x·ΔWᵀ = s · w1 ×₁ (x ×₂ w2) — two small contractions whose intermediates are activation-sized;
- LoHa: (A1·B1) ∘ (A2·B2) = (A1 ⊙ A2)·(B1 ⊙ B2), the row-wise (out × r1·r2) and column-wise (r1·r2 × in)
  Khatri–Rao products, so x·ΔWᵀ = s · (x·(B1 ⊙ B2)ᵀ)·(A1 ⊙ A2)ᵀ, a LoRA of rank r1·r2. Used while those factors
  are smaller than ΔW itself (r1·r2·(in + out) < in·out: rank 16 on 3072 × 3072 is 1.6 M against 9.4 M values);
  larger ranks keep peft's ΔW.

Module or rank dropout (never set by fluxlora; peft's defaults are 0), merged or disabled adapters, and layers
without a plain 2-D factorisation fall back to peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.loha.layer import Linear as PeftLoHaLinear
from peft.tuners.lokr.layer import Linear as PeftLoKrLinear


def _plain(layer: torch.nn.Module) -> bool:
    """Whether every active adapter of `layer` can take the activation path: not merged or disabled, and no module
    dropout (a random skip of the whole adapter) or, while training, rank dropout."""
    if layer.disable_adapters or layer.merged:
        return False
    for name in layer.active_adapters:
        if name not in layer._available_adapters:
            continue
        if layer.module_dropout.get(name, 0.0) or (layer.training and layer.rank_dropout.get(name, 0.0)):
            return False
    return True


def _forward(layer, peft_forward, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LyCORIS forward with module dropout 0 (always apply the adapter), without its `torch.rand` test."""
    if not _plain(layer):
        return peft_forward(layer, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    for name in layer.active_adapters:
        if name in layer._available_adapters:
            result = result + layer._get_delta_activations(name, x, *args, **kwargs)
    return result.to(previous_dtype)


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.linear(x, kron(w1, w2) * scale)` without forming the (a·b) × (c·d) matrix: w1 (a × c), w2 (b × d),
    x (…, c·d) → (…, a·b). The contraction order keeps the smaller of the two intermediates."""
    a, c = w1.shape
    b, d = w2.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, c, d)
    if c * b <= a * d:
        t = torch.matmul(xs, w2.t())                 # (N, c, b): t[n, j, k] = Σ_l x[n, j, l] w2[k, l]
        y = torch.matmul(t.transpose(1, 2), w1.t())  # (N, b, a): y[n, k, i] = Σ_j t[n, j, k] w1[i, j]
        y = y.transpose(1, 2)
    else:
        t = torch.matmul(w1, xs)                     # (N, a, d): t[n, i, l] = Σ_j w1[i, j] x[n, j, l]
        y = torch.matmul(t, w2.t())                  # (N, a, b)
    return y.reshape(*lead, a * b) * scale


def hadamard_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                     w2b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down == (w1a @ w1b) * (w2a @ w2b): up (out × r1·r2), down (r1·r2 × in)."""
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    up = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(out, r1 * r2)
    down = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(r1 * r2, w1b.shape[1])
    return up, down


class LoKrLinear(PeftLoKrLinear):
    """peft's LoKr Linear whose update is applied as `kron_linear` (see the module's docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _forward(self, PeftLoKrLinear.forward, x, *args, **kwargs)

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args: Any,
                               **kwargs: Any) -> torch.Tensor:
        if adapter_name in self.lokr_t2 or (self.training and self.rank_dropout[adapter_name]):
            return super()._get_delta_activations(adapter_name, input, *args, **kwargs)
        w1 = (self.lokr_w1[adapter_name] if adapter_name in self.lokr_w1
              else self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name])
        w2 = (self.lokr_w2[adapter_name] if adapter_name in self.lokr_w2
              else self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name])
        # peft casts the input to ΔW's dtype (kron promotes w1's and w2's)
        x = self._cast_input_dtype(input, torch.promote_types(w1.dtype, w2.dtype))
        return kron_linear(x, w1, w2, self.scaling[adapter_name])


class LoHaLinear(PeftLoHaLinear):
    """peft's LoHa Linear whose update is applied as a rank r1·r2 product (see the module's docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _forward(self, PeftLoHaLinear.forward, x, *args, **kwargs)

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args: Any,
                               **kwargs: Any) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        out, in_ = w1a.shape[0], w1b.shape[1]
        inner = w1a.shape[1] * w2a.shape[1]
        if (adapter_name in self.hada_t1 or (self.training and self.rank_dropout[adapter_name])
                or inner * (in_ + out) >= in_ * out):
            return super()._get_delta_activations(adapter_name, input, *args, **kwargs)
        up, down = hadamard_factors(w1a, w1b, w2a, w2b)
        x = self._cast_input_dtype(input, up.dtype)
        return F.linear(F.linear(x, down), up) * self.scaling[adapter_name]


_SWAPS = {PeftLoKrLinear: LoKrLinear, PeftLoHaLinear: LoHaLinear}


def use_activation_forward(model: torch.nn.Module) -> int:
    """Give every peft LoKr/LoHa Linear in `model` the activation forward of this module (in place, like
    `fluxlora.perf.fp8.store_fp8`: the layer keeps its parameters and stays an instance of peft's class); returns
    how many layers were switched."""
    n = 0
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
            n += 1
    return n
