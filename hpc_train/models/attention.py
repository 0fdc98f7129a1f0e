"""The varlen attention for packed rows, registered with transformers' attention interface.

A packed row carries ``cu_seq_lens_q`` (sample boundaries); attention then runs per sample:
flash-attn's varlen kernel on a GPU that has it, otherwise an exact PyTorch path (causal SDPA
per sample). Without ``cu_seq_lens_q`` (an ordinary padded batch, generation) it is plain
SDPA with the usual mask. Only the language model uses it; vision towers keep their own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hpc_train.models.varlen_backend import FLASH_ATTN, flash_varlen, varlen_backend

VARLEN = "hpc_varlen"


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """(batch, heads, seq, dim) in; (batch, seq, heads, dim) out, as transformers expects."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if key.shape[2] != query.shape[2]:
        # transformers builds a KV cache when use_cache is on (even in training), which would
        # prepend past keys to a packed row and make every boundary wrong.
        raise ValueError("a packed row cannot be run with a KV cache: call the model with use_cache=False")
    if query.shape[0] != 1:
        raise ValueError("a packed batch must be one row (batch size 1); got "
                         f"{query.shape[0]} rows with cu_seq_lens")
    dropout = dropout if module.training else 0.0
    if varlen_backend(query.is_cuda, query.dtype, _capability(query.device)) == FLASH_ATTN:
        out = flash_varlen()(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                    cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=kwargs["max_length_q"],
                    max_seqlen_k=kwargs["max_length_k"], dropout_p=dropout, softmax_scale=scaling,
                    causal=True)
        return out[None], None
    bounds = cu.tolist()  # one small host copy per layer call; exact on any device
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q = query[:, :, start:end]
        k = key[:, :, start:end]
        v = value[:, :, start:end]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def mask_unless_causal_is_exact(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                                kv_offset: int = 0, attention_mask: torch.Tensor | None = None,
                                **kwargs: Any) -> torch.Tensor | None:
    """The mask function transformers calls for ``hpc_varlen``: none for a row without padding
    or cache offset (a packed row, whose varlen attention never reads a mask, or a full causal
    row, which SDPA's own causal flag serves exactly); the ordinary SDPA mask otherwise.

    A packed row has no attention mask, so transformers sees the packing in ``position_ids``
    and would build a (1, 1, T, T) mask of the sample boundaries: 256 MiB at 16k tokens, held
    through forward and backward, read by nobody.
    """
    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Make ``attn_implementation="hpc_varlen"`` known to transformers (idempotent)."""
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, mask_unless_causal_is_exact)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch the language model (not the vision tower) to the varlen attention."""
    register_varlen_attention()
    config = model.config
    text = getattr(config, "text_config", None)
    if text is None:
        raise ValueError("the model has no text_config; packing supports vision-language models only")
    text._attn_implementation = VARLEN


def uses_varlen_attention(model: torch.nn.Module) -> bool:
    text = getattr(model.config, "text_config", None)
    return getattr(text, "_attn_implementation", None) == VARLEN
