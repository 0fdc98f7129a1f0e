"""``hpc-train cache-vision CONFIG``: fill a run's ``data.vision_cache`` before it trains.

The run's own model (loaded, frozen and adapted as training would, so the keys are the run's),
pipeline and collator encode every training sample with media that is not cached yet: the tower
and connector only, never the language model. Under a launcher each rank takes every
``world_size``-th record; the ranks need not hold the same modules (nothing here is collective
but the final counts). It says how far it got as it goes and, at the end, the cache's size and how
many samples were already there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpc_train.config import RunConfig
from hpc_train.data.batching.collate import FloatCast, model_inputs
from hpc_train.data.caches.feature_writer import flush_writers, store_computed
from hpc_train.data.caches.vision_cache import VISION_FEATURES
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.device import choose_device
from hpc_train.dist import DistInfo, all_gather, init_distributed
from hpc_train.errors import ConfigError
from hpc_train.models.cached_vision import merged_features
from hpc_train.train.evaluate import to_device
from hpc_train.train.trainable_model import load_training_model, model_source
from hpc_train.train.vision_cache_setup import open_vision_cache, vision_cache_refusal

_PROGRESS_S = 30.0


@dataclass
class CacheFill:
    """What one ``cache-vision`` did (summed over ranks)."""

    samples: int = 0
    """Training samples with media."""
    already: int = 0
    computed: int = 0
    skipped: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0

    def describe(self, root: str) -> str:
        rate = self.already / self.samples if self.samples else 0.0
        return (f"cache-vision: {self.samples} training samples with media: {self.computed} computed and stored, "
                f"{self.already} already cached (hit rate {rate:.0%}), {self.skipped} skipped as unusable; "
                f"{root} holds {self.bytes_stored / 2**20:.1f} MiB; {self.seconds:.0f} s")


def fill_vision_cache(config: RunConfig, info: DistInfo) -> CacheFill:
    """Encode and store this rank's share of the training samples not cached yet."""
    if config.data.vision_cache is None:
        raise ConfigError("data.vision_cache is not set. Fix: data.vision_cache=DIR (the folder the run will read)")
    if config.train.mode == "baseline":
        raise ConfigError("a baseline run does not train, so it reads no vision cache. Fix: train.mode=lora or full")
    started = time.perf_counter()
    device = choose_device(info, config.train.device)
    init_distributed(info, device, timeout_s=config.train.collective_timeout_s)
    loaded = load_training_model(config, info, device, model_source(config, info), None)
    refusal = vision_cache_refusal(config, loaded)
    if refusal is not None:
        raise ConfigError(refusal)
    pipeline = build_pipeline(config.data, loaded.processor, loaded.family).with_vision_cache(
        open_vision_cache(config, loaded), zero_stage=0)
    records = read_split(config, "train")
    mine = [r for r in (records[i] for i in range(info.rank, len(records), info.world_size)) if r.has_media()]
    dataset = pipeline.dataset(mine, cached=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train.micro_batch_size, num_workers=config.data.num_workers,
        collate_fn=FloatCast(pipeline.collator(cached=True), loaded.dtype))
    inner = loaded.family.inner_model(loaded.model)
    fill = CacheFill(samples=len(mine))
    said = time.perf_counter()
    loaded.model.train()  # as in training (the tower has no dropout: the cache refuses one)
    for batch in loader:
        features = batch.get(VISION_FEATURES)
        fill.skipped += batch["num_skipped"]
        if features is None:
            continue
        fill.already += features.samples_cached
        fill.computed += features.samples_computed
        if not features.samples_computed:
            continue
        merged_features(inner, loaded.family.name, to_device(model_inputs(batch), device), features)
        store_computed(features)
        if info.is_main and time.perf_counter() - said > _PROGRESS_S:
            done = fill.already + fill.computed + fill.skipped
            print(f"cache-vision: rank 0: {done}/{len(mine)} samples ({fill.computed} computed)", flush=True)
            said = time.perf_counter()
    flush_writers()
    return _summed(fill, config.vision_cache_dir, time.perf_counter() - started)


def _summed(fill: CacheFill, root: str, seconds: float) -> CacheFill:
    counts = all_gather([fill.samples, fill.already, fill.computed, fill.skipped])
    total = [sum(rank[k] for rank in counts) for k in range(4)]
    stored = sum(p.stat().st_size for p in Path(root).rglob("*.safetensors"))
    return CacheFill(*total, bytes_stored=stored, seconds=seconds)


__all__ = ["CacheFill", "fill_vision_cache"]
