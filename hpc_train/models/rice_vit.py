"""The RICE-ViT vision tower and patch merger of LLaVA-OneVision-1.5, written from its architecture.

transformers has no class for it and the checkpoint's own code does not import on transformers 5
(and we never run a model folder's code), so it is ours, with the hub checkpoint's parameter
names and shapes under ``visual.``: ``patch_embed.proj`` (a 14-px convolution, no bias),
``class_embedding`` and ``class_pos_emb``, ``pre_layernorm``, ``blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}`` and ``merger.{ln_q, mlp.0, mlp.2}``.

The forward, per image or video frame (a frame is its own segment: frames never attend to each
other): patch rows (3·14·14 values, in the processor's 2×2 merge-window order) are embedded,
a learned class token goes before each segment with its own learned rotary angles, every row
gets 2-D rotary angles from its (row, column) in the grid, then a pre-LayerNorm and pre-norm
blocks with attention confined to the segment; the class tokens are dropped and each 2×2
window of rows is merged into one row of the language model's width.

Where this differs from the checkpoint's reference code, on purpose: the reference drops the
class tokens at each segment's offset counted without the class tokens before it, so with two
or more images or frames in a call every segment after the first keeps a class token and a
neighbour's patch and loses its own last patch. Here each segment drops its own class token, as
the project's training code and transformers' port of the model do
(``tests/unit/test_llava_ov_1_5_reference.py`` holds both sets of numbers).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer


@strict
class RiceVitConfig(PreTrainedConfig):
    """The ``vision_config`` (model_type ``rice_vit``) of a LLaVA-OneVision-1.5 ``config.json``
    (the published values are the defaults; ``text_hidden_size`` is the merger's output width)."""

    model_type = "rice_vit"
    base_config_key = "vision_config"

    depth: int = 24
    embed_dim: int = 1024
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    text_hidden_size: int = 4096


class PatchEmbed(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.channels, self.patch = config.in_channels, config.patch_size
        self.proj = nn.Conv2d(self.channels, config.hidden_size, config.patch_size, config.patch_size, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # the parameter as iterated: reading .weight here would make ZeRO-3 gather it for this module too
        rows = rows.view(-1, self.channels, self.patch, self.patch).to(next(self.proj.parameters()).dtype)
        return self.proj(rows).flatten(1)


class Attention(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self.qkv(x).view(rows, 3, self.heads, -1).unbind(1)  # out-features q | k | v, head-major
        q, k = (rotated(t, cos, sin) for t in (q, k))
        return self.proj(segments.attention(q, k, v).reshape(rows, -1))


class Segments:
    """The tower's rows cut into segments (an image, or one video frame, with its class token)
    that attend only within themselves: segments of one length run as one batch of SDPA without
    a mask (a whole video's frames at once), so no rows × rows mask is ever made."""

    def __init__(self, sizes: list[int], device: torch.device) -> None:
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, size in enumerate(sizes):
            by_length[size].append(index)
        self.groups = [(torch.tensor([starts[i] for i in members])[:, None] + torch.arange(size)).to(device)
                       for size, members in by_length.items()]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(rows, heads, dim) each in, (rows, heads, dim) out."""
        out = q.new_empty(q.shape)
        for rows in self.groups:  # (segments, length) row indices
            picked = [t[rows].transpose(1, 2) for t in (q, k, v)]  # (segments, heads, length, dim)
            out[rows.flatten()] = F.scaled_dot_product_attention(*picked).transpose(1, 2).flatten(0, 1)
        return out


def rotated(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions, NeoX style (halves, not interleaved), computed in fp32."""
    first, second = t.float().chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return (t.float() * cos[:, None] + turned * sin[:, None]).to(t.dtype)


class Mlp(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(GradientCheckpointingLayer):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        # the reference fixes the blocks' epsilon, whatever layer_norm_eps says (it sets the others)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """Each 2×2 window of rows (consecutive in the processor's order) into one language-model row."""

    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.window = config.spatial_merge_size**2
        width = config.hidden_size * self.window
        self.ln_q = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, x.shape[-1] * self.window))


class RiceVisionTower(nn.Module):
    """``visual.*`` of the hub checkpoint: ``(pixel rows [N, 3·14·14], grid_thw [n, 3]) -> [N / 4, text width]``."""

    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.class_pos_emb = nn.Parameter(torch.randn(1, self.head_dim // 2))
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.merger = Merger(config)
        # 2-D rotary: a quarter of each head's dimensions per axis; not in the checkpoint
        self.register_buffer("inv_freq", self.rotary_frequencies(), persistent=False)

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_heads

    def rotary_frequencies(self) -> torch.Tensor:
        quarter = self.head_dim // 2
        return 1.0 / 10000 ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = grid_thw.tolist()  # host bookkeeping: the batch keeps it on the CPU
        x = self.patch_embed(pixel_values)
        angles = self.patch_angles(grid).to(x.device)
        sizes = [int(h * w) for t, h, w in grid for _ in range(int(t))]  # one segment a frame
        x, angles, keep = with_class_tokens(x, angles, sizes, self.class_embedding.to(x.dtype),
                                            self.class_pos_emb.float())
        x = self.pre_layernorm(x)
        doubled = torch.cat([angles, angles], dim=-1)
        cos, sin = doubled.cos(), doubled.sin()
        segments = Segments([size + 1 for size in sizes], x.device)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x.index_select(0, keep))

    def patch_angles(self, grid: list[list[int]]) -> torch.Tensor:
        """[N, head/2]: each patch row's angles from its row, then its column, in merge-window order."""
        merge = self.config.spatial_merge_size
        longest = max(max(h, w) for _, h, w in grid)
        table = torch.outer(torch.arange(longest, device=self.inv_freq.device).float(), self.inv_freq.float())
        parts = []
        for t, h, w in grid:
            rows = torch.arange(h)[:, None].expand(h, w)
            cols = torch.arange(w)[None, :].expand(h, w)
            order = [p.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten() for p in (rows, cols)]
            parts.append(torch.cat([table[order[0]], table[order[1]]], dim=-1).repeat(int(t), 1))
        return torch.cat(parts)


def with_class_tokens(x: torch.Tensor, angles: torch.Tensor, sizes: list[int], token: torch.Tensor,
                      token_angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` and its angles with a class token before each segment of ``sizes`` rows, and the
    indices of the patch rows (to keep after the blocks; an index, not a mask, so that the
    planner's fake tensors know the shape)."""
    rows, row_angles, keep = [], [], []
    start = 0
    for index, size in enumerate(sizes):
        rows += [token[None], x[start:start + size]]
        row_angles += [token_angles.to(angles.device), angles[start:start + size]]
        keep.append(torch.arange(start + index + 1, start + index + 1 + size))
        start += size
    return torch.cat(rows), torch.cat(row_angles), torch.cat(keep).to(x.device)


__all__ = ["RiceVisionTower", "RiceVitConfig", "Segments"]
