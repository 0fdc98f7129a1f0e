"""The attention mask transformers builds for one packed row, with the ordinary SDPA mask function
registered for ``hpc_varlen`` (before) and with ours (after), side by side in one process.

A packed row has no attention mask, so transformers finds the packing in ``position_ids`` and
asks the registered mask function for the row's (1, 1, T, T) block-causal mask. The varlen
attention never reads it, yet the model keeps it through forward and backward. Prints, per row
length, the bytes of the mask each function returns and the time to build it.

    python benchmarks/packed_mask.py [--lengths 4096 16384 32768] [--sample-len 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask  # noqa: E402

from hpc_train.models.attention import VARLEN, register_varlen_attention  # noqa: E402
from hpc_train.models.host_masks import mask_unless_causal_is_exact  # noqa: E402


def packed_positions(length: int, sample_len: int) -> torch.Tensor:
    return (torch.arange(length) % sample_len)[None]


def build(mask_function: Callable[..., object], length: int, sample_len: int) -> tuple[int, float]:
    """(bytes of the mask returned, seconds to build it) for one packed row of ``length`` tokens."""
    AttentionMaskInterface.register(VARLEN, mask_function)
    config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = VARLEN
    embeds = torch.zeros(1, length, 8)
    started = time.perf_counter()
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=packed_positions(length, sample_len))
    seconds = time.perf_counter() - started
    return (0 if mask is None else mask.numel() * mask.element_size()), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--sample-len", type=int, default=512)
    args = parser.parse_args(argv)
    register_varlen_attention()
    print("| row tokens | mask, SDPA mask function (before) | build time | mask, ours (after) | build time |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        before, t_before = build(sdpa_mask, length, args.sample_len)
        after, t_after = build(mask_unless_causal_is_exact, length, args.sample_len)
        print(f"| {length:,} | {before / 2**20:,.0f} MiB | {t_before * 1e3:,.0f} ms | "
              f"{after / 2**20:,.0f} MiB | {t_after * 1e3:,.2f} ms |")
    register_varlen_attention()


if __name__ == "__main__":
    main()
