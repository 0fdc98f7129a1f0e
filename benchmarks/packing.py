"""Padded vs packed training, side by side in one process, on two realistic length mixes.

    python benchmarks/packing.py [--steps 30] [--family smolvlm] [--preset smolvlm-256m]

For each mix it prints: packing efficiency (real tokens / token slots), real tokens per
second packed vs padded (and their ratio), and the peak memory of each (GPU: peak allocated;
CPU: peak resident-set growth during the phase). Both variants see the same samples in the
same order; the padded one batches ``--batch`` samples padded to the longest, the packed one
fills rows of ``--max-seq-len`` tokens.

- text-heavy: multi-turn dialogs of very different lengths around one or two frames, as in
  streaming-assistant data;
- video-heavy: short captions beside long multi-frame videos (the vision tower's cost is the
  same either way, so the ratio is smaller and the time goes to the vision tower).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.config import DataConfig  # noqa: E402
from hpc_train.data.batching.collate import step_inputs  # noqa: E402
from hpc_train.data.batching.packing import drop_too_long, plan_packs  # noqa: E402
from hpc_train.data.encoding.lengths import sample_lengths  # noqa: E402
from hpc_train.data.pipeline import build_pipeline  # noqa: E402
from hpc_train.data.sources.records import read_records  # noqa: E402
from hpc_train.data.sources.synthetic import COLOURS, SyntheticSpec, make_dataset  # noqa: E402
from hpc_train.models.attention import use_varlen_attention  # noqa: E402
from hpc_train.models.families import get_family  # noqa: E402
from hpc_train.models.presets import get_preset  # noqa: E402
from hpc_train.models.tiny import build_preset, build_tiny  # noqa: E402
from hpc_train.synthetic_words import vocabulary_text  # noqa: E402
from hpc_train.train.loss import token_mean_loss  # noqa: E402


def write_mix(kind: str, base: Path, n: int, seed: int) -> Path:
    """A JSONL of the mix, reusing the synthetic media under ``base/media``."""
    rng = random.Random(seed)
    train = [json.loads(line) for line in (base / "train.jsonl").read_text().splitlines()]
    images = [r["image"] for r in train if r["kind"] == "image"]
    videos = [r["video"] for r in train if r["kind"] == "video"]
    sentences = [s for s in vocabulary_text() if len(s) > 20 and "<" not in s]
    colours = list(COLOURS)
    records = []
    for i in range(n):
        if kind == "text-heavy":
            frames = rng.sample(images, rng.choice([1, 2]))
            turns = [{"from": "human", "value": "<image>" * len(frames) + "\nWhat colour is the ball?"},
                     {"from": "gpt", "value": rng.choice(colours)}]
            for _ in range(int(rng.expovariate(1 / 8))):  # dialogs of very different lengths
                talk = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 6)))
                turns += [{"from": "human", "value": talk}, {"from": "gpt", "value": rng.choice(sentences)}]
            records.append({"id": f"t{i}", "image": frames, "conversations": turns})
        else:
            if rng.random() < 0.5:
                records.append({"id": f"v{i}", "video": rng.choice(videos), "conversations": [
                    {"from": "human", "value": "<video>\nDescribe the clip."},
                    {"from": "gpt", "value": f"A {rng.choice(colours)} ball moves."}]})
            else:
                records.append({"id": f"c{i}", "image": rng.choice(images), "conversations": [
                    {"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": rng.choice(colours)}]})
    path = base / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class PeakMemory:
    """Peak GPU allocation, or peak growth of the process's resident memory on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self.proc = psutil.Process()
            self.start = self.proc.memory_info().rss
            self.peak = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.running = False
            self.thread.join()
            self.gib = (self.peak - self.start) / 2**30


class VisionClock:
    """Forward time spent inside the vision tower (where video-heavy batches spend theirs)."""

    def __init__(self, tower: torch.nn.Module, device: torch.device) -> None:
        self.seconds = 0.0
        self.device = device
        tower.register_forward_pre_hook(self._start)
        tower.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _start(self, *args: object) -> None:
        self._sync()
        self.began = time.perf_counter()

    def _stop(self, *args: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self.began


def train_steps(model: torch.nn.Module, batches: list[dict], device: torch.device, dtype: torch.dtype,
                clock: VisionClock) -> tuple[float, int, float, float]:
    """(seconds, real tokens, peak GiB, vision-forward seconds) of one optimizer step per batch,
    after one warm-up step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict) -> None:
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                  if isinstance(v, torch.Tensor) else v for k, v in step_inputs(batch).items()}
        token_mean_loss(model, inputs).value.backward()  # the trainer's loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    clock.seconds = 0.0
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds, sum(b["num_real_tokens"] for b in batches[1:]), memory.gib, clock.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="smolvlm", choices=["smolvlm", "llava_onevision"])
    parser.add_argument("--preset", default=None, help="a published architecture (GPU), else the tiny model")
    parser.add_argument("--samples", type=int, default=2000, help="samples planned per mix")
    parser.add_argument("--steps", type=int, default=20, help="packed rows timed per mix")
    parser.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = build_preset(args.preset) if args.preset else build_tiny(args.family)
    family = get_family(get_preset(args.preset).family if args.preset else args.family)
    model.to(device, dtype).train()
    model.config.use_cache = False
    use_varlen_attention(model)
    data = DataConfig(video={"num_frames": 8}, max_seq_len=args.max_seq_len)
    pipeline = build_pipeline(data, processor, family)
    tower = model.get_submodule(family.module_groups["vision"][0].rstrip("."))
    clock = VisionClock(tower, device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_dataset(base, SyntheticSpec(n_train=120, n_eval=1, seed=args.seed))
        for mix in ("text-heavy", "video-heavy"):
            records = read_records(write_mix(mix, base, args.samples, args.seed), media_root=data.media_root)
            dataset = pipeline.dataset(records)
            lengths, _ = drop_too_long(sample_lengths(records, pipeline.encoder, data), args.max_seq_len)
            usable = [i for i, n in enumerate(lengths) if n >= 0]
            sub = plan_packs([lengths[i] for i in usable], args.max_seq_len, seed=args.seed, epoch=0)
            plan = type(sub)(rows=[[usable[i] for i in row] for row in sub.rows],
                             real_tokens=sub.real_tokens, slots=sub.slots)
            rows = plan.rows[: args.steps + 1]
            used = [i for row in rows for i in row]
            samples = {i: dataset[i] for i in used}
            pack = pipeline.packed_collator(rows_per_micro=1)
            packed = [pack([samples[i] for i in row]) for row in rows]
            collate = pipeline.collator()
            padded = [collate([samples[i] for i in used[k:k + args.batch]])
                      for k in range(0, len(used), args.batch)]
            t_pad, tok_pad, mem_pad, vis_pad = train_steps(model, padded, device, dtype, clock)
            t_pack, tok_pack, mem_pack, vis_pack = train_steps(model, packed, device, dtype, clock)
            slots_pad = sum(b["num_slots"] for b in padded[1:])
            results[mix] = {
                "samples": len(used), "mean_len": sum(lengths[i] for i in used) / len(used),
                "packing_efficiency": plan.efficiency,
                "padded_efficiency": tok_pad / slots_pad,
                "padded_tokens_per_s": tok_pad / t_pad, "packed_tokens_per_s": tok_pack / t_pack,
                "speedup": (tok_pack / t_pack) / (tok_pad / t_pad),
                "padded_peak_gib": mem_pad, "packed_peak_gib": mem_pack,
                "padded_vision_share": vis_pad / t_pad, "packed_vision_share": vis_pack / t_pack,
            }
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"model: {args.preset or 'tiny ' + args.family}, max_seq_len {args.max_seq_len}, padded batch {args.batch}")
    print(f"{'mix':<12}{'pack eff':>10}{'pad eff':>10}{'padded tok/s':>14}{'packed tok/s':>14}{'ratio':>8}"
          f"{'pad GiB':>10}{'pack GiB':>10}{'vision share pad/pack':>24}")
    for mix, r in results.items():
        print(f"{mix:<12}{100 * r['packing_efficiency']:>9.1f}%{100 * r['padded_efficiency']:>9.1f}%"
              f"{r['padded_tokens_per_s']:>14.0f}{r['packed_tokens_per_s']:>14.0f}{r['speedup']:>8.2f}"
              f"{r['padded_peak_gib']:>10.3f}{r['packed_peak_gib']:>10.3f}"
              f"{100 * r['padded_vision_share']:>11.0f}% / {100 * r['packed_vision_share']:.0f}%")
    if device.type == "cpu":
        print("CPU memory is the growth of the resident set during each phase: the allocator keeps what "
              "the first phase took, so compare memory on a GPU run.")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
