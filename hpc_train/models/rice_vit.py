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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig


class RiceVitConfig(PretrainedConfig):
    """The ``vision_config`` (model_type ``rice_vit``) of a LLaVA-OneVision-1.5 ``config.json``."""

    model_type = "rice_vit"

    def __init__(self, depth: int = 24, hidden_size: int = 1024, intermediate_size: int = 4096,
                 num_heads: int = 16, in_channels: int = 3, patch_size: int = 14, spatial_merge_size: int = 2,
                 temporal_patch_size: int = 1, layer_norm_eps: float = 1e-5, text_hidden_size: int = 4096,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.depth, self.hidden_size, self.intermediate_size = depth, hidden_size, intermediate_size
        self.num_heads, self.in_channels, self.patch_size = num_heads, in_channels, patch_size
        self.spatial_merge_size, self.temporal_patch_size = spatial_merge_size, temporal_patch_size
        self.layer_norm_eps, self.text_hidden_size = layer_norm_eps, text_hidden_size


class PatchEmbed(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.channels, self.patch = config.in_channels, config.patch_size
        self.proj = nn.Conv2d(self.channels, config.hidden_size, config.patch_size, config.patch_size, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.view(-1, self.channels, self.patch, self.patch).to(self.proj.weight.dtype)
        return self.proj(rows).flatten(1)


class Attention(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self.qkv(x).view(rows, 3, self.heads, -1).unbind(1)  # out-features q | k | v, head-major
        q, k = (rotated(t, cos, sin) for t in (q, k))
        same = segments[:, None] == segments[None, :]  # attention stays within an image or frame
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same)
        return self.proj(out.transpose(0, 1).reshape(rows, -1))


def rotated(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions, NeoX style (halves, not interleaved), computed in fp32."""
    first, second = t.float().chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return (t.float() * cos[:, None] + turned * sin[:, None]).to(t.dtype)


class Mlp(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """Each 2×2 window of rows (consecutive in the processor's order) into one language-model row."""

    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.window = config.spatial_merge_size**2
        width = config.hidden_size * self.window
        self.ln_q = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, x.shape[-1] * self.window))


class RiceVisionTower(nn.Module):
    """``visual.*`` of the hub checkpoint: ``(pixel rows [N, 3·14·14], grid_thw [n, 3]) -> [N / 4, text width]``."""

    def __init__(self, config: RiceVitConfig) -> None:
        super().__init__()
        self.config = config
        width, head = config.hidden_size, config.hidden_size // config.num_heads
        self.patch_embed = PatchEmbed(config)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.class_pos_emb = nn.Parameter(torch.randn(1, head // 2))
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.merger = Merger(config)
        # 2-D rotary: a quarter of each head's dimensions per axis, rebuilt on load (not saved)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head // 2, 2, dtype=torch.float) / (head // 2)),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        angles = self.patch_angles(grid_thw)
        sizes = [int(h * w) for t, h, w in grid_thw.tolist() for _ in range(int(t))]  # one segment a frame
        x, angles, segments, keep = with_class_tokens(x, angles, sizes, self.class_embedding.to(x.dtype),
                                                      self.class_pos_emb.float())
        x = self.pre_layernorm(x)
        doubled = torch.cat([angles, angles], dim=-1)
        cos, sin = doubled.cos(), doubled.sin()
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x[keep])

    def patch_angles(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N, head/2]: each patch row's angles from its row, then its column, in merge-window order."""
        merge = self.config.spatial_merge_size
        table = torch.outer(torch.arange(int(grid_thw[:, 1:].max()), device=self.inv_freq.device).float(),
                            self.inv_freq)
        parts = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h)[:, None].expand(h, w)
            cols = torch.arange(w)[None, :].expand(h, w)
            order = [p.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten() for p in (rows, cols)]
            parts.append(torch.cat([table[order[0]], table[order[1]]], dim=-1).repeat(int(t), 1))
        return torch.cat(parts)


def with_class_tokens(x: torch.Tensor, angles: torch.Tensor, sizes: list[int], token: torch.Tensor,
                      token_angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` and its angles with a class token before each segment of ``sizes`` rows; each row's
    segment index; and which rows are the patches (to keep after the blocks)."""
    rows, row_angles, segments, keep = [], [], [], []
    start = 0
    for index, size in enumerate(sizes):
        rows += [token[None], x[start:start + size]]
        row_angles += [token_angles.to(angles.device), angles[start:start + size]]
        segments.append(torch.full((size + 1,), index, device=x.device))
        keep += [False] + [True] * size
        start += size
    return (torch.cat(rows), torch.cat(row_angles), torch.cat(segments),
            torch.tensor(keep, device=x.device))


__all__ = ["RiceVisionTower", "RiceVitConfig"]
