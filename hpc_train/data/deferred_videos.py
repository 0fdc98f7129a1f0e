"""Training videos decoded by the GPU (``data.video.device=cuda``).

The DataLoader workers encode each training sample as usual, except that a video the run does
not read prepared gets stand-in frames: black, of the size the decoder gives (read from the
file's header), so the processor makes exactly the tokens the real frames make. The training
process then decodes those videos with torchcodec on the GPU (NVDEC), runs the processor on the
frames there, checks that the tokens are the stand-ins', and gives the collator the sample
with its media on the host, as every other sample has them. The CPU's part per video shrinks to
reading a header and processing black frames; the GPU's decoder does the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hpc_train.config import RunConfig
from hpc_train.data.dataset import MediaLoader, SampleDataset, Skipped
from hpc_train.data.decoding.video_backends import resolve_backend
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.data.video_on_device import FIX_DEVICE, DeferredSample
from hpc_train.errors import ConfigError, DataError, HpcTrainError
from hpc_train.models.families import Family


class DeviceVideos:
    """The training process's stage between the workers and the collator: each
    :class:`DeferredSample` encoded again with its videos decoded on ``device``."""

    def __init__(self, dataset: SampleDataset, device: str) -> None:
        self.dataset = dataset
        self.loader = MediaLoader(dataset.data, prepared=dataset.media.prepared, device=device)

    def __call__(self, items: Sequence[EncodedSample | Skipped | DeferredSample]) -> list[EncodedSample | Skipped]:
        return [self._decoded(item) if isinstance(item, DeferredSample) else item for item in items]

    def _decoded(self, item: DeferredSample) -> EncodedSample | Skipped:
        record = self.dataset.records[item.index]
        try:
            sample = self.dataset.encoder.encode(record, self.loader.load(record))
        except DataError as exc:
            if self.dataset.data.on_bad_sample == "skip":
                return Skipped(id=record.id, reason=str(exc), kind="bad_record")
            raise
        if not torch.equal(sample.input_ids, item.sample.input_ids):
            raise HpcTrainError(f"{record.source}:{record.line} (id {record.id}): the decoded frames give other "
                                "tokens than the stand-in frames the loader encoded the sample with. Report it with "
                                "the record; meanwhile set data.video.device=cpu")
        return dataclasses.replace(item.sample, media={k: v.cpu() for k, v in sample.media.items()})


def videos_on_device(config: RunConfig, family: Family, device: torch.device) -> bool:
    """Whether the training process decodes the training videos (``data.video.device=cuda``),
    refused with the fix where it cannot."""
    video = config.data.video
    if video.device != "cuda":
        return False
    if device.type != "cuda":
        raise ConfigError(f"data.video.device=cuda: this run trains on {device.type} (train.device="
                          f"{config.train.device}, CUDA available: {torch.cuda.is_available()}), where no GPU "
                          "decoder is. Fix: set data.video.device=cpu")
    if family.video_token is None:
        raise ConfigError(f"data.video.device=cuda: {family.name} takes a video as a run of images, which its "
                          "image processor makes on the CPU. Fix: set data.video.device=cpu")
    if resolve_backend(video.backend) != "torchcodec":
        raise ConfigError(f"data.video.device=cuda needs torchcodec, and data.video.backend={video.backend} "
                          f"resolves to decord here. Fix: {FIX_DEVICE}")
    return True


__all__ = ["DeviceVideos", "videos_on_device"]
