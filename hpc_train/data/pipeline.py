"""The data pipeline, wired once: records → media → chat encoder → dataset → collator.

Training, evaluation, ``check-data`` and the benchmarks all build their samples through
:func:`build_pipeline`, so an audit, a benchmark and a run see the same samples for the same
config: the same media loader, the same encoder (system prompt included) and the same blank
media snippets that keep every rank's modules the same.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc_train.config import DataConfig
from hpc_train.data.batching.collate import Collator
from hpc_train.data.batching.packing import PackedCollator
from hpc_train.data.caches.prepared_media import prepared_media_for
from hpc_train.data.caches.vision_cache import FeatureCollation, VisionCache
from hpc_train.data.dataset import MediaLoader, SampleDataset
from hpc_train.data.encoding.tokenize import ChatEncoder, EncodedSample
from hpc_train.data.sources.records import Record
from hpc_train.models.families import Family


@dataclass(frozen=True)
class DataPipeline:
    """The parts that turn records of one model family into batches."""

    data: DataConfig
    family: Family
    encoder: ChatEncoder
    media: MediaLoader
    blanks: list[EncodedSample] = field(repr=False)
    """One masked, unsupervised snippet per media kind (see :meth:`ChatEncoder.blank_media`)."""
    vision_cache: VisionCache | None = None
    """The frozen-vision feature cache, for the datasets and collators asked for ``cached``."""
    feature_collation: FeatureCollation | None = None

    @property
    def pad_token_id(self) -> int:
        return self.encoder.tokenizer.pad_token_id

    def with_vision_cache(self, cache: VisionCache, *, zero_stage: int) -> DataPipeline:
        """This pipeline with ``cache`` for its ``cached`` datasets and collators."""
        collation = FeatureCollation(root=str(cache.store.root), token_ids=cache.token_ids,
                                     blank_when_cached=zero_stage == 3)
        return dataclasses.replace(self, vision_cache=cache, feature_collation=collation)

    def dataset(self, records: Sequence[Record], *, frame_share: tuple[int, int] | None = None,
                cached: bool = False, defer_videos: bool = False) -> SampleDataset:
        """``frame_share=(rank, size)``: rank ``rank`` of a sequence-parallel group's training
        samples, with only its share of each video's frames decoded (see :class:`MediaLoader`).
        ``cached``: samples from the vision cache where it has them. ``defer_videos``: stand-in
        frames for the videos not prepared, left to the training process
        (:mod:`~hpc_train.data.deferred_videos`)."""
        media = self.media if frame_share is None and not defer_videos else MediaLoader(
            self.data, frame_share=frame_share, prepared=self.media.prepared, defer_videos=defer_videos)
        return SampleDataset(records, self.encoder, media, self.data, vision_cache=self.vision_cache if cached else None)

    def collator(self, *, padding_side: str = "right", cached: bool = False) -> Collator:
        """Padded batches; ``left`` for generation prompts."""
        return Collator(self.family, self.pad_token_id, blanks=self.blanks, padding_side=padding_side,
                        features=self.feature_collation if cached else None)

    def packed_collator(self, *, rows_per_micro: int, cached: bool = False) -> PackedCollator:
        """One packed row of ``rows_per_micro`` x ``data.max_seq_len`` slots per micro-batch."""
        return PackedCollator(self.family.name, self.pad_token_id, blanks=self.blanks,
                              pad_to=self.data.max_seq_len * rows_per_micro,
                              features=self.feature_collation if cached else None)


def build_pipeline(data: DataConfig, processor: Any, family: Family) -> DataPipeline:
    """The pipeline for a model's processor (its tokenizer and image processor)."""
    encoder = ChatEncoder(processor, family, system_prompt=data.system_prompt, split_frames=data.video.split_frames)
    prepared = prepared_media_for(data, processor, family)
    if prepared is not None and prepared.note:
        warnings.warn(prepared.note, stacklevel=2)
    return DataPipeline(data=data, family=family, encoder=encoder, media=MediaLoader(data, prepared=prepared),
                        blanks=encoder.blank_media())


__all__ = ["DataPipeline", "build_pipeline"]
