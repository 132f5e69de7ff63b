"""Inputs made alike for every block of a kind, so that regional torch.compile makes one graph per kind and shape.

Dynamo guards each compiled block's forward on its tensor inputs' `requires_grad` and strides, so a block that gets
its inputs in another form compiles a graph of its own. In a Flux transformer two blocks did (tiny Flux on the CPU,
`TORCH_LOGS=recompiles`, two token counts: 8 graphs where 4 do; on the H200 a whole run at 1024 px spent 68 s in
its first step and 54 s in the first step of its second shape, most of it compiling):

- the first block with trainable parameters gets hidden states that do not require grad (the embedders and any
  blocks before it are frozen); every block after it gets ones that do;
- the first Flux single block gets the text and image states as two tensors; every later one gets two views of one
  tensor (a single block splits its output instead of copying it), so the strides differ.

`match_block_inputs` puts a forward pre-hook on those two blocks. The first trainable block gets its states as
leaves that require grad: autograd computes their gradient, which nothing reads. That costs one block's input
gradient per step. The first single block gets its states as views of one concatenated copy, one sequence copy per
step. The hooks act only with grad enabled: sampling runs the blocks uncompiled under no_grad.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from fluxlora.perf.checkpointing import transformer_blocks

log = logging.getLogger(__name__)

_STATES = ("hidden_states", "encoder_hidden_states")
"""The block arguments that carry the sequence from block to block (positional in this order, or by keyword)."""


def _get(args: tuple, kwargs: dict, i: int) -> Any:
    name = _STATES[i]
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)


def _set(args: tuple, kwargs: dict, i: int, value: torch.Tensor) -> tuple[tuple, dict]:
    name = _STATES[i]
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (*args[:i], value, *args[i + 1:]), kwargs


def _states(block: torch.nn.Module) -> int:
    """How many of `_STATES` the block's forward takes (Chroma's single blocks take the joined sequence alone)."""
    params = inspect.signature(block.forward).parameters
    return 2 if "encoder_hidden_states" in params else 1


def _as_grad_leaves(module: torch.nn.Module, args: tuple, kwargs: dict, states: int) -> tuple[tuple, dict] | None:
    """The first `states` of `_STATES` as leaves that require grad (`states`: `_states(module)`, read once)."""
    if not torch.is_grad_enabled():
        return None
    for i in range(states):
        x = _get(args, kwargs, i)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            args, kwargs = _set(args, kwargs, i, x.detach().requires_grad_())
    return args, kwargs


def _as_views_of_one(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Text and image states as the two views a single block's output is split into (text first)."""
    if not torch.is_grad_enabled():
        return None
    image, text = _get(args, kwargs, 0), _get(args, kwargs, 1)
    if not (isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor)):
        return None
    joined = torch.cat([text, image], dim=1)
    args, kwargs = _set(args, kwargs, 1, joined[:, :text.shape[1]])
    return _set(args, kwargs, 0, joined[:, text.shape[1]:])


def match_block_inputs(transformer: torch.nn.Module) -> list[Any]:
    """Hook the blocks whose inputs differ from the rest of their kind; returns the hook handles.

    Call it after the LoRA layers exist (they decide which block is the first trainable one). A frozen block before
    the first trainable one of the same kind keeps a graph of its own: making its inputs require grad would make
    autograd run backward through it, costing more per step than one compile does once.
    """
    handles = []
    first = next(((name, b) for name, b in transformer_blocks(transformer)
                  if any(p.requires_grad for p in b.parameters())), None)
    if first is not None:
        grad_leaves = functools.partial(_as_grad_leaves, states=_states(first[1]))  # the signature, not per call
        handles.append(first[1].register_forward_pre_hook(grad_leaves, with_kwargs=True))
    singles = getattr(transformer, "single_transformer_blocks", [])
    if len(singles) > 1 and _states(singles[0]) == 2:
        # registered after the grad hook when both are on this block: the grad leaves are then the two states,
        # which the concatenation joins, so the views require grad as those of every later block do
        handles.append(singles[0].register_forward_pre_hook(_as_views_of_one, with_kwargs=True))
    if first is not None:
        log.debug("block inputs matched: grad leaves at %s", first[0])
    return handles
