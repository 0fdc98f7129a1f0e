"""Ulysses sequence parallelism for both families' language models, on DeepSpeed's own parts
(Arctic Long Sequence Training).

- **Groups**: DeepSpeed's (``parallel_state_sp``): each run of N consecutive ranks is a
  sequence-parallel group; the module is the ``mpu`` given to ``deepspeed.initialize``, so ZeRO
  partitions over every rank and sums gradients over the group (averaging over the rest).
- **Attention**: DeepSpeed's ``UlyssesSPAttentionHF`` around our own attention: its all-to-all
  hands each rank the whole sequence for 1/N of the heads, so our kernels (per-sample varlen
  for packed rows, SDPA otherwise) see every sample whole and no sample sees another.
- **Sequence**: each rank's micro-batch arrives cut to its slice of tokens and positions
  (:mod:`hpc_train.data.batching.sequence_shard`); the sample boundaries (``cu_seq_lens``) stay those of
  the whole row.
- **Vision**: :mod:`hpc_train.models.vision_share` — each rank encodes its share of the media.

Training only: in evaluation and generation (``model.eval()``) every rank runs whole samples.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from hpc_train.errors import ConfigError
from hpc_train.models.families import get_family
from hpc_train.models.host_masks import register_with_masks

ULYSSES_SUFFIX = "_ulysses"


def allowed_sizes(text_config: Any, up_to: int = 64) -> list[int]:
    """Group sizes Ulysses can split this language model's heads over: N divides the query
    heads, and the key/value heads divide N or N divides them (DeepSpeed then repeats them)."""
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return [n for n in range(1, up_to + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)]


def check_sequence_parallel(text_config: Any, size: int, world_size: int) -> None:
    """Refuse a group size this world or this language model cannot take, saying which it can."""
    if world_size % size:
        raise ConfigError(f"train.sequence_parallel={size} does not divide the world size {world_size} (ranks are "
                          f"grouped {size} at a time). Fix: run a multiple of {size} ranks or change "
                          "train.sequence_parallel")
    if size not in allowed_sizes(text_config, size):
        heads, kv = text_config.num_attention_heads, getattr(text_config, "num_key_value_heads", None)
        raise ConfigError(
            f"train.sequence_parallel={size}: the language model has {heads} attention heads and {kv} key/value "
            f"heads, which Ulysses cannot split over {size} ranks (the heads must divide evenly). Fix: use one of "
            f"{allowed_sizes(text_config)}")
    if any(kind != "full_attention" for kind in getattr(text_config, "layer_types", None) or []):
        raise ConfigError("train.sequence_parallel: this language model has sliding-window layers, whose mask the "
                          "sequence split cannot keep. Fix: train.sequence_parallel=1")


def join_sequence_groups(size: int) -> ModuleType:
    """DeepSpeed's sequence-parallel groups of ``size`` (made once per process): its ``mpu``."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    try:
        existing = mpu.get_sequence_parallel_world_size()
    except AssertionError:
        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
        return mpu
    if existing != size:
        raise ValueError(f"this process already has sequence-parallel groups of {existing}, not {size}")
    return mpu


def media_token_ids(config: Any, family_name: str) -> dict[str, int]:
    """The placeholder token of each kind of media features the model merges into the sequence."""
    return {kind: getattr(config, f"{kind}_token_id") for kind in get_family(family_name).media_kinds}


def use_sequence_parallel(model: Any, family_name: str, mpu: ModuleType) -> None:
    """Split ``model``'s training forward over this rank's sequence-parallel group (after
    :func:`~hpc_train.models.attention.use_varlen_attention`, whose attention it wraps)."""
    group = mpu.get_sequence_parallel_group()
    family = get_family(family_name)
    _wrap_attention(model.config.text_config, group)
    family.share_vision(family.inner_model(model), group)


def _wrap_attention(text: Any, group: Any) -> None:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = text._attn_implementation
    heads = text.num_attention_heads

    class AnyRowsUlysses(UlyssesSPAttentionHF):
        """DeepSpeed's Ulysses attention for micro-batches of any number of rows (it fixes
        the rows when built; a stand-in micro-batch has one)."""

        def forward(self, module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            rows = query.shape[0]
            if rows != self.batch_size:
                self.batch_size = rows
                self.required_query_shape = torch.Size([0, rows, heads, self.attn_head_size])
                self.required_key_value_shape = torch.Size([0, rows, self.global_kv_head_count, self.attn_head_size])
                self.required_context_shape = torch.Size([0, rows, self.attn_head_size * heads // self.world_size])
            return super().forward(module, query, *args, **kwargs)

    ulysses = AnyRowsUlysses(
        attn=ALL_ATTENTION_FUNCTIONS[name], batch_size=1, attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=getattr(text, "num_key_value_heads", None) or heads, num_hidden_layers=text.num_hidden_layers,
        process_group=group, seq_length_is_variable=True, disable_in_eval=True)

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        # In training the batch is right-padded and unmasked (data.sequence_shard): a mask
        # here would be one of the local slice, wrong for the whole sequence.
        mask = None if module.training else attention_mask
        return ulysses(module, query, key, value, mask, *args, **kwargs)

    # One name per group size: a plan tries several sizes in one process.
    wrapped = f"{name}{ULYSSES_SUFFIX}{ulysses.world_size}"
    register_with_masks(wrapped, attention)
    text._attn_implementation = wrapped


__all__ = ["allowed_sizes", "check_sequence_parallel", "join_sequence_groups", "media_token_ids",
           "use_sequence_parallel"]
