"""The frozen-vision feature cache gives the losses and gradients of the run without it, for
batches all cached, none cached and mixed, padded and packed, both families and every media kind;
a cached sample runs no tower and decodes no media; changed weights, settings or files and torn
entries are misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.data.batching.collate import step_inputs
from hpc_train.data.caches.feature_writer import flush_writers
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.records import read_records
from hpc_train.models.attention import use_varlen_attention
from hpc_train.models.load import model_family
from hpc_train.models.tiny import build_tiny
from hpc_train.train.loss import loss_for
from hpc_train.train.profile_report import vision_tower
from hpc_train.train.trainable_model import LoadedModel, prepare_for_training
from hpc_train.train.vision_cache_setup import open_vision_cache, vision_cache_refusal
from tests.conftest import TINY_RECIPES as RECIPES
from tests.unit.test_supervised_loss import assert_same, loss_and_grads

KINDS = ["image", "multi_image", "video", "audio", "text"]


def run_config(family: str, cache: Path, *overrides: str):
    return load_config(RECIPES[family], ["data.eval=null", "model.dtype=fp32", "train.device=cpu", "lora.dropout=0",
                                         "train.mode=lora", "lora.target=llm", "data.video.num_frames=4",
                                         f"data.vision_cache={cache}", *overrides])


def loaded(family: str, processor, config) -> LoadedModel:
    torch.manual_seed(0)
    model, _ = build_tiny(family)
    model = prepare_for_training(model, config, model_family(config.model)).train()
    use_varlen_attention(model)
    return LoadedModel(model=model, processor=processor, family=model_family(config.model), dtype=torch.float32,
                       source=Path("."))


class Setup:
    """A prepared LoRA model, its run's pipeline with the cache, and one record of each kind."""

    def __init__(self, family: str, processor, data_dir: Path, cache: Path, *overrides: str) -> None:
        self.config = run_config(family, cache, *overrides)
        self.loaded = loaded(family, processor, self.config)
        self.plain = build_pipeline(self.config.data, processor, self.loaded.family)
        self.cache = open_vision_cache(self.config, self.loaded)
        self.pipeline = self.plain.with_vision_cache(self.cache, zero_stage=2)
        records = read_records(data_dir / "train.jsonl", media_root=None)
        first: dict[str, int] = {}
        for i, record in enumerate(records):
            first.setdefault(record.kind, i)
        self.records = [records[first[kind]] for kind in KINDS]
        self.loss = loss_for(self.config.data, self.config.train, zero=2)

    def clear(self) -> None:
        """An empty cache (the module's tests share one setup per family)."""
        import shutil

        flush_writers()
        shutil.rmtree(self.cache.store.root, ignore_errors=True)

    def samples(self, cached: bool) -> list[EncodedSample]:
        dataset = self.pipeline.dataset(self.records, cached=cached)
        return [dataset[i] for i in range(len(dataset))]

    def batch(self, samples: list[EncodedSample], cached: bool, packed: bool) -> dict:
        pipeline = self.pipeline if cached else self.plain
        collate = (pipeline.packed_collator(rows_per_micro=1, cached=cached) if packed
                   else pipeline.collator(cached=cached))
        return step_inputs(collate(samples))

    def loss_and_grads(self, inputs: dict) -> tuple[float, list[torch.Tensor]]:
        model = self.loaded.model
        return loss_and_grads(model, lambda: self.loss(model, inputs).value)


@pytest.fixture(scope="module", params=list(RECIPES))
def setup(request, loaded_tiny, synthetic_data, tmp_path_factory) -> Setup:
    family = request.param
    return Setup(family, loaded_tiny[family][1], synthetic_data, tmp_path_factory.mktemp(f"cache-{family}"),
                 "data.max_seq_len=4096")


def tower_calls(setup: Setup) -> list[int]:
    calls: list[int] = []
    vision_tower(setup.loaded.model, setup.loaded.family).register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cold_then_warm_cache_gives_the_uncached_losses_and_gradients(setup, packed):
    setup.clear()
    plain = setup.samples(cached=False)
    expected = setup.loss_and_grads(setup.batch(plain, cached=False, packed=packed))

    cold = setup.samples(cached=True)
    assert [s.feature_key is not None for s in cold] == [True, True, True, True, False]
    assert_same(expected, setup.loss_and_grads(setup.batch(cold, cached=True, packed=packed)))
    flush_writers()

    warm = setup.samples(cached=True)
    assert [bool(s.features) for s in warm] == [True, True, True, True, False]
    assert all(not s.media for s in warm)
    assert [s.input_ids.tolist() for s in warm] == [s.input_ids.tolist() for s in plain]
    calls = tower_calls(setup)
    assert_same(expected, setup.loss_and_grads(setup.batch(warm, cached=True, packed=packed)))
    assert not calls, "a fully cached batch ran the vision tower"


def test_a_batch_of_cached_and_uncached_samples_gives_the_uncached_loss(setup):
    setup.clear()
    plain = setup.samples(cached=False)
    cold = setup.samples(cached=True)
    setup.loss_and_grads(setup.batch(cold, cached=True, packed=False))
    flush_writers()
    warm = setup.samples(cached=True)
    for order in ([0, 2, 4], [2, 1, 3], [3, 0]):  # the uncached sample first, between, last
        mixed = [warm[i] if k % 2 else cold[i] for k, i in enumerate(order)]
        expected = setup.loss_and_grads(setup.batch([plain[i] for i in order], cached=False, packed=False))
        assert_same(expected, setup.loss_and_grads(setup.batch(mixed, cached=True, packed=False)))


def test_a_cached_sample_decodes_no_media(setup, monkeypatch):
    setup.samples(cached=True)
    setup.loss_and_grads(setup.batch(setup.samples(cached=True), cached=True, packed=False))
    flush_writers()
    import hpc_train.data.dataset as dataset

    def refuse(*args, **kwargs):
        raise AssertionError("decoded media of a cached sample")

    for name in ("load_image", "load_video", "load_audio"):
        monkeypatch.setattr(dataset, name, refuse)
    assert all(s.features for s in setup.samples(cached=True)[:4])


def entry_files(cache: Path) -> set[Path]:
    return set(cache.rglob("*.safetensors"))


def test_changed_weights_settings_or_files_miss_exactly_the_affected_entries(loaded_tiny, synthetic_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    family = "smolvlm"
    processor = loaded_tiny[family][1]
    first = Setup(family, processor, data, tmp_path / "cache")
    first.loss_and_grads(first.batch(first.samples(cached=True), cached=True, packed=False))
    flush_writers()
    assert all(s.features for s in first.samples(cached=True)[:4])

    video = first.records[KINDS.index("video")].videos[0]
    video.write_bytes(video.read_bytes())  # the same bytes, a new file time: another file to the key
    again = first.samples(cached=True)
    assert [bool(s.features) for s in again] == [True, True, False, True, False]

    other_frames = Setup(family, processor, data, tmp_path / "cache", "data.video.num_frames=3")
    assert not any(s.features for s in other_frames.samples(cached=True))

    with torch.no_grad():
        tower = vision_tower(first.loaded.model, first.loaded.family)
        next(tower.parameters()).add_(1e-3)
    changed = open_vision_cache(first.config, first.loaded)
    assert changed.prefix != first.cache.prefix


def test_a_torn_entry_is_recomputed_never_used(loaded_tiny, synthetic_data, tmp_path):
    family = "llava_onevision"
    setup = Setup(family, loaded_tiny[family][1], synthetic_data, tmp_path / "cache")
    setup.loss_and_grads(setup.batch(setup.samples(cached=True), cached=True, packed=False))
    flush_writers()
    image = setup.records[0]
    key = setup.cache.sample_key(image)
    from hpc_train.data.caches.vision_cache import entry_key

    path = setup.cache.store.path_for(entry_key(key, "image"))
    path.write_bytes(path.read_bytes()[:-9])
    sample = setup.pipeline.dataset([image], cached=True)[0]
    assert sample.features is None and sample.feature_key == key and sample.media
    setup.loss_and_grads(setup.batch([sample], cached=True, packed=False))
    flush_writers()
    assert setup.pipeline.dataset([image], cached=True)[0].features


@pytest.mark.parametrize("overrides,why", [
    (["lora.target=all"], "vision (LoRA)"),
    (["train.mode=full", "model.freeze=[vision]"], "connector (trained)"),
    (["train.sequence_parallel=2"], "sequence_parallel"),
])
def test_a_run_training_the_tower_or_connector_does_not_use_the_cache(overrides, why, loaded_tiny, tmp_path):
    family = "smolvlm"
    config = run_config(family, tmp_path, *overrides)
    refusal = vision_cache_refusal(config, loaded(family, loaded_tiny[family][1], config))
    assert refusal is not None and why in refusal and "Fix" in refusal


def test_a_frozen_run_uses_the_cache(loaded_tiny, tmp_path):
    for setting in (["lora.target=llm"], ["train.mode=full", "model.freeze=[vision,connector]"]):
        config = run_config("smolvlm", tmp_path, *setting)
        assert vision_cache_refusal(config, loaded("smolvlm", loaded_tiny["smolvlm"][1], config)) is None


def test_collated_rows_say_where_each_cached_row_goes(setup):
    setup.clear()
    cold = setup.samples(cached=True)
    setup.loss_and_grads(setup.batch(cold, cached=True, packed=False))
    flush_writers()
    warm = setup.samples(cached=True)
    batch = setup.batch([cold[0], warm[1]], cached=True, packed=False)
    from hpc_train.data.caches.vision_cache import VISION_FEATURES

    rows = batch[VISION_FEATURES].kinds["image"]
    assert cold[0].features is None and len(rows.computed_at) > 0
    assert rows.cached_at.min() == len(rows.computed_at)  # the first sample's rows come first
    assert rows.total == len(rows.cached_at) + len(rows.computed_at)
    assert len(rows.to_store) == 1 and len(rows.to_store[0][1]) == len(rows.computed_at)


def test_a_tower_with_dropout_does_not_use_the_cache(loaded_tiny, tmp_path):
    config = run_config("smolvlm", tmp_path)
    model = loaded("smolvlm", loaded_tiny["smolvlm"][1], config)
    model.model.config.vision_config.attention_dropout = 0.1
    refusal = vision_cache_refusal(config, model)
    assert refusal is not None and "dropout (0.1)" in refusal


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_under_zero3_a_fully_cached_batch_still_runs_the_tower_on_a_blank(setup, packed):
    setup.clear()
    plain = setup.samples(cached=False)
    expected = setup.loss_and_grads(setup.batch(plain, cached=False, packed=packed))
    setup.loss_and_grads(setup.batch(setup.samples(cached=True), cached=True, packed=packed))
    flush_writers()
    warm = setup.samples(cached=True)
    zero3 = setup.plain.with_vision_cache(setup.cache, zero_stage=3)
    collate = zero3.packed_collator(rows_per_micro=1, cached=True) if packed else zero3.collator(cached=True)
    calls = tower_calls(setup)
    got = setup.loss_and_grads(step_inputs(collate(warm)))
    assert calls, "no rank may skip the tower's gathers under ZeRO-3"
    assert got[0] == pytest.approx(expected[0], rel=1e-5)


def test_the_cache_folder_may_name_the_output_dir_and_nothing_else(tmp_path):
    from hpc_train.errors import ConfigError

    config = run_config("smolvlm", "{output_dir}/vc", f"output_dir={tmp_path}")
    assert config.vision_cache_dir == f"{tmp_path}/vc"
    with pytest.raises(ConfigError, match="only use the placeholder"):
        run_config("smolvlm", "{run}/vc")


def test_samples_kept_in_memory_are_kept_once_their_features_are_cached(loaded_tiny, synthetic_data, tmp_path):
    setup = Setup("smolvlm", loaded_tiny["smolvlm"][1], synthetic_data, tmp_path / "cache", "data.cache_samples=true")
    dataset = setup.pipeline.dataset(setup.records, cached=True)
    cold = [dataset[i] for i in range(len(dataset))]
    setup.loss_and_grads(setup.batch(cold, cached=True, packed=False))
    flush_writers()
    warm = [dataset[i] for i in range(len(dataset))]
    assert [bool(s.features) for s in warm] == [True, True, True, True, False]
    assert all(dataset[i] is warm[i] for i in range(len(dataset)))
