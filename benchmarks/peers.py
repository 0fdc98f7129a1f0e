"""Peers: hpc-train (padded, packed) against HF ``Trainer`` and TRL ``SFTTrainer`` on one tiny SmolVLM.

    pip install -c hpc_train/constraints.txt -e ".[peers]"   # trl, in the environment that runs this
    python benchmarks/peers.py [--nproc 1 2] [--steps 24] [--rounds 1] [--n-train 600] [--out DIR]

Every arm trains the same tiny random SmolVLM (``hpc-train make-tiny smolvlm``) on the same
synthetic records (images, two-image samples and text-only; videos and audio are left out because
the peers' processors would encode them differently from hpc-train), with the same micro-batch,
steps, learning rate, fp32, DeepSpeed ZeRO-2, on the CPU, with 1 and 2 processes:

- ``hpc padded`` / ``hpc packed``: ``python -m hpc_train train`` with ``data.packing`` off / on;
- ``hf trainer``: ``transformers.Trainer`` with a hand-written collator that renders each record
  with the processor's chat template and supervises only the assistant answers;
- ``trl sft``: ``trl.SFTTrainer`` with ``assistant_only_loss`` (given TRL's own copy of SmolVLM's
  template if it refuses the tiny model's); if it still refuses or crashes, its error is that arm's result.

Arms are interleaved (round robin within each round); numbers are medians over rounds. Measured:
real tokens/s (non-padding tokens of all ranks per second of optimizer-step time, steps after
the first), wall time (launch to exit), start-up (launch to the first optimizer step's metrics
line), final loss, and held-out answer accuracy (greedy, exact match after hpc-train's
normalisation, on ``--n-eval`` eval records); ratios are against ``hpc padded``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("hpc padded", "hpc packed", "hf trainer", "trl sft")
KINDS = {"image": 0.6, "multi_image": 0.15, "text": 0.25}
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}
DS_CONFIG = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


# ----------------------------------------------------------------------------- launching arms
def launcher(nproc: int) -> list[str]:
    """One process directly; two through torchrun (as a user launches either toolkit)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def arm_command(arm: str, nproc: int, opts: argparse.Namespace, out: Path) -> list[str]:
    """The command line of one arm's run."""
    if arm.startswith("hpc"):
        args = ["train", "tiny_smolvlm", "model.preset=null", f"model.path={opts.work / 'model'}",
                f"data.train={opts.work / 'data' / 'train.jsonl'}", f"data.eval={opts.work / 'data' / 'eval.jsonl'}",
                f"output_dir={out}", f"train.max_steps={opts.steps}", f"train.micro_batch_size={opts.batch}",
                f"train.lr={opts.lr}", "model.dtype=fp32", "train.device=cpu", "train.mode=full",
                f"data.packing={'true' if arm == 'hpc packed' else 'false'}", "deepspeed.config=ds_configs/zero2.json",
                *([f"data.max_seq_len={opts.pack_len}"] if arm == "hpc packed" else []),
                "data.num_workers=1", f"eval.max_samples={opts.n_eval}", "train.log_every=1"]
        return [*launcher(nproc), "-m", "hpc_train", *args]
    worker = "trl" if arm == "trl sft" else "hf"
    return [*launcher(nproc), str(Path(__file__).resolve()), "--worker", worker, "--work", str(opts.work),
            "--out", str(out), "--steps", str(opts.steps), "--batch", str(opts.batch), "--lr", str(opts.lr),
            "--n-eval", str(opts.n_eval)]


def run_arm(arm: str, nproc: int, opts: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Launch one arm, time its start-up and wall, and read its results."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    log = (out / "log.txt").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(arm_command(arm, nproc, opts, out), env={**os.environ, **ENV}, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    startup = None
    while proc.poll() is None:
        if startup is None and metrics.is_file() and metrics.read_text().strip():
            startup = time.perf_counter() - started
        time.sleep(0.05)
    wall = time.perf_counter() - started
    log.close()
    if proc.returncode:
        return {"error": error_text(out)}
    result = read_results(out)
    return {**result, "startup_s": startup, "wall_s": wall}


def error_text(out: Path) -> str:
    """The worker's own error line if it wrote one, else the log's last error line."""
    written = out / "error.txt"
    if written.is_file():
        return written.read_text().strip()
    lines = [s for s in (out / "log.txt").read_text().splitlines() if "Error" in s or "error" in s]
    return lines[-1].strip() if lines else "failed (see log.txt)"


def read_results(out: Path) -> dict[str, Any]:
    """Real tokens/s, final loss and accuracy, from hpc-train's outputs or the worker's."""
    steps = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if s.strip()]
    steps = [s for s in steps if "loss" in s and "step_time_s" in s]
    timed = steps[1:] or steps  # the first step pays one-off warm-up costs in every toolkit
    tokens_per_s = sum(s["tokens"] for s in timed) / sum(s["step_time_s"] for s in timed)
    evaluated = json.loads((out / "eval_results.json").read_text())
    return {"tokens_per_s": tokens_per_s, "loss": steps[-1]["loss"], "accuracy": evaluated.get("accuracy")}


# ----------------------------------------------------------------------------- the peers' side
def split_media(text: str) -> list[dict[str, str]]:
    """A turn's text as chat-template content: ``<image>`` placeholders become image parts."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(text.split("<image>")):
        if k:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def chat_messages(record: Any, *, with_last_answer: bool = True) -> list[dict[str, Any]]:
    """The record's conversation in the processor's chat format (what a user would write)."""
    turns = list(record.turns) if with_last_answer else list(record.turns[:-1])
    return [{"role": t.role, "content": split_media(t.text)} for t in turns]


def record_images(record: Any) -> list[Any]:
    from hpc_train.data.decoding.media import load_image

    return [load_image(p) for p in record.images]


class AssistantOnlyCollator:
    """Hand-written: render with the chat template, then supervise from each ``Assistant:`` to its
    ``<end_of_utterance>`` (inclusive); everything else, padding included, is -100."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        tok = processor.tokenizer
        self.start = tok("\nAssistant:", add_special_tokens=False)["input_ids"][1:]
        self.end = tok.convert_tokens_to_ids("<end_of_utterance>")

    def __call__(self, records: list[Any]) -> dict[str, Any]:
        texts = [self.processor.apply_chat_template(chat_messages(r), tokenize=False) for r in records]
        images = [record_images(r) for r in records]
        # Idefics3's processor takes one image list per text (empty for text-only samples)
        kwargs = {"images": images} if any(images) else {}
        batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"])
        return batch

    def labels(self, ids: Any, mask: Any) -> Any:
        labels = ids.new_full(ids.shape, -100)
        n = len(self.start)
        for row in range(ids.shape[0]):
            seq = ids[row].tolist()
            inside = False
            for i, token in enumerate(seq):
                if not mask[row, i]:
                    continue
                if inside:
                    labels[row, i] = token
                    inside = token != self.end
                elif i >= n and seq[i - n + 1:i + 1] == self.start:
                    inside = True
        return labels


class Counter:
    """Real (attention-mask) tokens the trainer has stepped on, counted in the training process
    (the collator runs in a DataLoader worker, whose counts would not come back)."""

    real_tokens = 0


def counting(trainer_class: type) -> type:
    """``trainer_class`` whose ``training_step`` adds each micro-batch's real tokens to Counter."""

    class Counting(trainer_class):
        def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            Counter.real_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


def timing_callback(out: Path, counter: type[Counter]) -> Any:
    """Per optimizer step: loss, real tokens of all ranks and step time, as hpc-train logs them."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """From one step's end to the next: Trainer fetches a step's batches before ``on_step_begin``,
        and hpc-train's step time includes that wait."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last, self.tokens = time.perf_counter(), counter.real_tokens

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            seconds, tokens = now - self.last, counter.real_tokens - self.tokens
            self.last, self.tokens = now, counter.real_tokens
            if dist.is_initialized():
                import torch

                total = torch.tensor([tokens], dtype=torch.float64)
                dist.all_reduce(total)
                tokens = int(total.item())
            self.pending = {"step": state.global_step, "tokens": tokens, "step_time_s": seconds}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and logs and "loss" in logs and hasattr(self, "pending"):
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({**self.pending, "loss": logs["loss"]}) + "\n")

    return Timing()


def accuracy(model: Any, processor: Any, records: list[Any]) -> float | None:
    """Greedy answers to each eval record's last question, exact match as hpc-train scores it."""
    import torch

    from hpc_train.evaluation.metrics import normalize_answer

    tok, correct = processor.tokenizer, 0
    eos = [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.eos_token_id]
    model.eval()
    for record in records:
        prompt = processor.apply_chat_template(chat_messages(record, with_last_answer=False),
                                               add_generation_prompt=True, tokenize=False)
        images = record_images(record)
        inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        answer = record.turns[-1].text
        budget = len(tok(answer, add_special_tokens=False)["input_ids"]) + 2
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=budget, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        correct += int(normalize_answer(text) == normalize_answer(answer))
    return correct / len(records) if records else None


def worker(opts: argparse.Namespace) -> int:
    """One peer run (HF Trainer or TRL SFTTrainer); writes metrics.jsonl and eval_results.json."""
    import torch.distributed as dist
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

    from hpc_train.data.sources.records import read_records

    out = Path(opts.out)
    processor = AutoProcessor.from_pretrained(opts.work / "model")
    model = AutoModelForImageTextToText.from_pretrained(opts.work / "model", dtype="float32")
    train = list(read_records(opts.work / "data" / "train.jsonl"))
    collator = AssistantOnlyCollator(processor)
    args = dict(output_dir=str(out / "trainer"), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                learning_rate=opts.lr, logging_steps=1, save_strategy="no", seed=0,
                # hpc-train's default schedule: cosine from the peak to 0.1 of it, no warm-up
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                report_to=[], use_cpu=True, deepspeed=DS_CONFIG, dataloader_num_workers=1,
                remove_unused_columns=False, disable_tqdm=True)
    try:
        build = trl_trainer if opts.worker == "trl" else hf_trainer
        trainer = build(model, processor, train, collator, args, TrainingArguments, out)
        trainer.add_callback(timing_callback(out, Counter))
        trainer.train()
    except Exception as exc:  # the peer's refusal or crash is that arm's result, shown whole
        (out / "error.txt").write_text(innermost_error(exc))
        raise
    if not dist.is_initialized() or dist.get_rank() == 0:
        held_out = list(read_records(opts.work / "data" / "eval.jsonl"))[:opts.n_eval]
        result = {"accuracy": accuracy(trainer.model, processor, held_out)}
        (out / "eval_results.json").write_text(json.dumps(result))
    return 0


def innermost_error(exc: BaseException) -> str:
    """The last ``SomethingError: message`` line of the exception's text: a DataLoader worker's
    own error is inside the message of the one the main process raises."""
    text = f"{type(exc).__name__}: {exc}"
    named = [s.strip() for s in text.splitlines() if re.match(r"\s*\w*(Error|Exception): ", s)]
    return (named[-1] if named else text.splitlines()[0])[:400]


def hf_trainer(model: Any, processor: Any, train: list, collator: Any, args: dict, arguments: Any,
               out: Path) -> Any:
    from transformers import Trainer

    return counting(Trainer)(model=model, args=arguments(**args), train_dataset=train, data_collator=collator)


def trl_trainer(model: Any, processor: Any, train: list, collator: Any, args: dict, arguments: Any,
                out: Path) -> Any:
    """TRL as its docs ask for vision data: a ``messages`` + ``images`` dataset, assistant-only loss.

    TRL adds its ``{% generation %}`` markers only to chat templates it knows by their exact text.
    The tiny model's template renders what SmolVLM's does but is spelled differently, so when TRL
    refuses it, the arm runs again with TRL's own copy of SmolVLM's template (checked to render
    every record the same), as a user of the published model gets; the refusal goes in note.txt.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in chat_messages(r)],
             "images": record_images(r)} for r in train]
    config = SFTConfig(**args, assistant_only_loss=True, max_length=None)

    def build() -> Any:
        return counting(SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                    processing_class=processor)

    try:
        return build()
    except ValueError as exc:
        if "chat template" not in str(exc):
            raise
        (out / "note.txt").write_text(f"tiny model's template refused ({exc}); ran with TRL's smolvlm.jinja")
        processor.chat_template = published_template(processor, [r["messages"] for r in rows])
        return build()


def published_template(processor: Any, conversations: list[list[dict]]) -> str:
    """TRL's copy of SmolVLM's chat template, after checking it renders every conversation as ours does."""
    from importlib.resources import files

    template = files("trl").joinpath("chat_templates", "smolvlm.jinja").read_text()
    for messages in conversations:
        ours = processor.apply_chat_template(messages, tokenize=False)
        theirs = processor.apply_chat_template(messages, tokenize=False, chat_template=template)
        if ours != theirs:
            raise RuntimeError(f"TRL's smolvlm.jinja renders differently: {theirs!r} vs {ours!r}")
    return template


# ----------------------------------------------------------------------------- driving and printing
def prepare(work: Path, n_train: int, n_eval: int) -> None:
    """The shared data and model, made once."""
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    if not (work / "data" / "train.jsonl").is_file():
        make_dataset(work / "data", SyntheticSpec(n_train=n_train, n_eval=max(n_eval, 1), kinds=tuple(KINDS),
                                                  weights=KINDS))
    if not (work / "model").is_dir():
        subprocess.run([sys.executable, "-m", "hpc_train", "make-tiny", "smolvlm", str(work / "model")],
                       check=True, env={**os.environ, **ENV}, cwd=ROOT, stdout=subprocess.DEVNULL)


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[tuple[int, str], list[dict]], opts: argparse.Namespace) -> None:
    print(f"\ntiny SmolVLM, {opts.n_train} records ({', '.join(KINDS)}), {opts.steps} steps, micro-batch "
          f"{opts.batch}, lr {opts.lr}, fp32, ZeRO-2, CPU; median of {opts.rounds} round(s)")
    print("| procs | arm | real tokens/s | vs hpc padded | wall (s) | start-up (s) | final loss | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for (nproc, arm), runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            print(f"| {nproc} | {arm} | error: {errors[0]} | | | | | |")
            continue
        base = median(results.get((nproc, "hpc padded"), []), "tokens_per_s")
        rate = median(runs, "tokens_per_s")
        ratio = f"{rate / base:.2f}x" if rate and base else "-"
        print(f"| {nproc} | {arm} | {fmt(rate, '.0f')} | {ratio} | {fmt(median(runs, 'wall_s'), '.1f')} | "
              f"{fmt(median(runs, 'startup_s'), '.1f')} | {fmt(median(runs, 'loss'), '.3f')} | "
              f"{fmt(median(runs, 'accuracy'), '.3f')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--pack-len", type=int, default=128,
                        help="hpc packed's row length (data.max_seq_len); the padded rows here reach about 60")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/hpc-train-peers"))
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["hf", "trl"], help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    opts.work = opts.out
    prepare(opts.work, opts.n_train, opts.n_eval)
    results: dict[tuple[int, str], list[dict]] = {(n, a): [] for n in opts.nproc for a in opts.arms}
    for round_ in range(opts.rounds):
        for nproc in opts.nproc:
            for arm in opts.arms:  # interleaved: each round runs every arm once, in turn
                run = run_arm(arm, nproc, opts, opts.out / f"r{round_}-p{nproc}-{arm.replace(' ', '-')}")
                results[(nproc, arm)].append(run)
                print(f"round {round_} procs {nproc} {arm}: {run}", flush=True)
    print_table(results, opts)
    for note in sorted(opts.out.glob("r*/note.txt")):
        print(f"{note.parent.name}: {note.read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
