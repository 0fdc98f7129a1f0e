"""The head and loss in tiles of supervised positions on real DeepSpeed ranks: a trained head,
untied over data-parallel ranks of which some micro-batches tile and some do not, and tied to
the embeddings under sequence parallelism, over accumulated micro-batches, trains to the losses
and gradients of the untiled head."""

from __future__ import annotations

import shutil
from pathlib import Path

from .test_sequence_parallel import assert_same_training, kinds_file, train

# one position of the tiny vocabulary a tile: as many tiles as supervised positions on each rank
TILES = "train.logits_tile_mib=0.0025"
# eight positions a tile: packed rows of 6 to 20 supervised positions, some in tiles, some whole
SOME_TILES = "train.logits_tile_mib=0.02"


def tied_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with its head tied to the input embeddings, as LLaVA-OneVision-0.5B's is."""
    from transformers import AutoModelForImageTextToText

    shutil.copytree(model_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    model.save_pretrained(out)
    return out


def test_an_untied_head_in_tiles_on_some_ranks_trains_as_the_whole_head(tmp_path, synthetic_data, tiny_model_dirs):
    data = kinds_file(synthetic_data, ("text", "image", "video"))
    common = ["train.mode=full", "train.max_steps=2", "train.grad_accum=2", "train.micro_batch_size=1",
              "data.packing=true", "data.max_seq_len=256", f"data.media_root={synthetic_data}"]
    model = tiny_model_dirs["smolvlm"]
    whole = train(tmp_path / "whole", "smolvlm", model, data, *common, nproc=2)
    tiled = train(tmp_path / "tiled", "smolvlm", model, data, *common, SOME_TILES, nproc=2)
    assert "in tiles of 8 positions" in tiled["log"]
    assert_same_training(tiled, whole)


def test_a_tied_head_in_tiles_under_sequence_parallelism_trains_as_one_process(
        tmp_path, synthetic_data, tiny_model_dirs):
    data = kinds_file(synthetic_data, ("text", "video"))
    model = tied_copy(tiny_model_dirs["llava_onevision"], tmp_path / "tied")
    common = ["train.mode=full", "train.max_steps=2", "train.grad_accum=2", "train.micro_batch_size=1",
              "data.video.num_frames=6", f"data.media_root={synthetic_data}"]
    whole = train(tmp_path / "whole", "llava_onevision", model, data, *common, nproc=1)
    tiled = train(tmp_path / "tiled", "llava_onevision", model, data, *common, TILES, "train.sequence_parallel=2",
                  nproc=2)
    assert "lm_head.weight" not in whole["grads"][1]  # the head is the embeddings
    assert_same_training(tiled, whole)
