"""NF4 storage of the frozen transformer blocks with bitsandbytes, configured through diffusers' `BitsAndBytesConfig`.

diffusers quantizes while `from_pretrained` loads (and refuses without a GPU); fluxlora builds its transformer on
the meta device and assigns tensors itself, so the loaded block Linears are replaced here by bitsandbytes'
`Linear4bit` the way diffusers' loader does it (`Params4bit(weight).to(device)` quantizes on the move). bitsandbytes
0.50 quantizes and runs NF4 on the CPU too. Embedders and the output layer stay in the compute dtype.
"""

from __future__ import annotations

import logging

import torch

from fluxlora.perf.checkpointing import transformer_blocks
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)


def nf4_config(compute_dtype: torch.dtype, double_quant: bool = False):
    """diffusers' BitsAndBytesConfig for NF4 weights computed in `compute_dtype`."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def _to_linear4bit(linear: torch.nn.Linear, config, device: torch.device):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=config.bnb_4bit_compute_dtype,
                          compress_statistics=config.bnb_4bit_use_double_quant,
                          quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                          device="meta")
    weight = linear.weight.detach().to("cpu", config.bnb_4bit_compute_dtype)
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                                 compress_statistics=config.bnb_4bit_use_double_quant,
                                 quant_storage=config.bnb_4bit_quant_storage).to(device)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.detach().to(device, config.bnb_4bit_compute_dtype),
                                    requires_grad=False)
    q.requires_grad_(False)
    return q


def quantize_blocks_nf4(transformer: torch.nn.Module, compute_dtype: torch.dtype,
                        device: torch.device | str | None = None, double_quant: bool = False) -> int:
    """Replace every Linear inside the double and single blocks by an NF4 `Linear4bit`; returns how many.

    Args:
        transformer: loaded weights (any device); call before LoRA layers are added.
        compute_dtype: dtype the weights are dequantized to for each matmul.
        device: where the quantized weights go (quantization happens on the way); default: where they are.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise FluxLoraError("memory.base_storage=nf4 needs bitsandbytes: pip install bitsandbytes") from e
    config = nf4_config(compute_dtype, double_quant)
    n = 0
    for block_name, block in transformer_blocks(transformer):
        for name, mod in list(block.named_modules()):
            if type(mod) is not torch.nn.Linear:
                continue
            if mod.weight.is_meta:
                raise FluxLoraError(f"nf4: {block_name}.{name} has no weights (meta); load them first")
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            dev = torch.device(device) if device is not None else mod.weight.device
            setattr(parent, child, _to_linear4bit(mod, config, dev))
            n += 1
    # what diffusers sets on a model it loaded in 4 bit; peft then wraps Linear4bit with its QLoRA layer
    transformer.is_loaded_in_4bit = True
    log.info("NF4 (bitsandbytes) on %d block Linears, computed in %s", n, compute_dtype)
    return n
