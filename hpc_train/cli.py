"""The ``hpc-train`` command: train, eval, compare-eval, cache-vision, prepare-media, plan, demo,
make-data, make-tiny, and the tools of :mod:`hpc_train.cli_tools` (doctor, check-data, show-config,
download, convert-proassist, topology)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hpc_train.cli_tools import add_tool_commands
from hpc_train.errors import ConfigError, HpcTrainError
from hpc_train.evaluation.compare import register as register_compare_eval


def _make_data(args: argparse.Namespace) -> int:
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    try:
        spec = SyntheticSpec(n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, caption_share=args.captions)
    except ValueError as exc:
        raise ConfigError(f"make-data: {exc}. Fix: pass --n-train and --n-eval >= 0, --captions between 0 and 1") from None
    summary = make_dataset(args.out, spec)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from hpc_train.models.tiny import save_tiny

    out = save_tiny(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} model and processor saved to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from hpc_train.config_file import load_config
    from hpc_train.dist import cleanup
    from hpc_train.train.run import PeerLost, run
    from hpc_train.train.trainer import OutOfMemoryStop, TrainingStopped

    config = load_config(args.config, args.overrides)
    try:
        return run(config, evaluate_only=args.command == "eval")
    except OutOfMemoryStop as exc:
        from hpc_train.plan.after_oom import plan_after_oom

        print(f"error: {plan_after_oom(exc)}", file=sys.stderr)
        return exc.exit_code
    except (TrainingStopped, PeerLost) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        # Left to interpreter exit, gloo's threads are sometimes torn down running, and the
        # process aborts (status -6) after it has already said what went wrong.
        cleanup()


def _cache_vision(args: argparse.Namespace) -> int:
    from hpc_train.cache_vision import fill_vision_cache
    from hpc_train.config_file import load_config
    from hpc_train.dist import cleanup, read_dist_env

    config = load_config(args.config, args.overrides)
    info = read_dist_env()
    try:
        fill = fill_vision_cache(config, info)
    finally:
        cleanup()
    if info.is_main:
        print(fill.describe(config.vision_cache_dir))
    return 0


def _prepare_media(args: argparse.Namespace) -> int:
    from hpc_train.config_file import load_config
    from hpc_train.prepare_media import default_workers, prepare_media, shard_of

    config = load_config(args.config, args.overrides)
    done = prepare_media(config, shard=shard_of(os.environ, args.shard), workers=args.workers or default_workers())
    print(done.describe(str(config.data.prepared_media)))
    return 1 if done.failed else 0


def _demo(args: argparse.Namespace) -> int:
    from hpc_train.demo import run_demo

    return run_demo(args.out, nproc=args.nproc, steps=args.steps, zero=args.zero, seed=args.seed,
                    captions=args.captions)


DOES_NOT_FIT = 3
"""``hpc-train plan``'s exit status when the run cannot fit (1 is any other failure)."""


def _plan(args: argparse.Namespace) -> int:
    from hpc_train.config_file import load_config
    from hpc_train.plan.command import format_plan, make_plan, sbatch_line, to_dict
    from hpc_train.plan.gpus import planned_gpu, plans_bf16

    config = load_config(args.config, args.overrides)
    gpu = planned_gpu(args.gpu)
    plan = make_plan(config, gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     bf16=plans_bf16(config, gpu), search=args.search, loader=args.loader == "on")
    sbatch = sbatch_line(plan, args.config, args.overrides) if gpu is not None else None
    print(format_plan(plan, sbatch), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**to_dict(plan), "sbatch": sbatch}, indent=2))
    return DOES_NOT_FIT if plan.fits is False else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_data_commands(sub)
    add_tool_commands(sub)
    register_compare_eval(sub)
    return parser


def _add_run_commands(sub: Any) -> None:
    """train, eval, cache-vision, prepare-media, plan: the commands that run a config."""
    for name, text in (("train", "train (or, in baseline mode, evaluate) a model; run under torchrun "
                                  "or the DeepSpeed launcher for several processes"),
                       ("eval", "evaluate a model (plus model.adapter) on data.eval: loss, perplexity, "
                                "answer accuracy -> OUTPUT_DIR/eval_results.json")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML config or shipped recipe name (e.g. tiny_smolvlm)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(func=_train)

    p = sub.add_parser("cache-vision", help="fill data.vision_cache with the frozen vision tower's features of "
                                            "every training sample before the run (also under a launcher)")
    p.add_argument("config", help="YAML config or shipped recipe name (the run's own)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cache_vision)

    p = sub.add_parser("prepare-media", help="decode the run's videos once into data.prepared_media, as it samples "
                                             "and resizes them (CPU only; a share per SLURM array task)")
    p.add_argument("config", help="YAML config or shipped recipe name (the run's own)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--shard", help="i/n: decode every n-th video from the i-th (default: this SLURM array task's "
                                   "or srun task's share, else all)")
    p.add_argument("--workers", type=int, help="decoding processes (default: the CPUs this process may use)")
    p.set_defaults(func=_prepare_media)

    p = sub.add_parser("plan", help="predict a run's peak GPU memory per rank (by component), its step time and "
                                    "what fits, before it is queued; exit 3 when it does not fit")
    p.add_argument("config", help="YAML config or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--gpu", default=None, help="the GPU to plan for (H100-80GB, A100-40GB, L4, ...; auto: this "
                                               "machine's); default: this machine as it is, memory only")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node (default 1)")
    p.add_argument("--search", choices=["auto", "up", "off"], default="auto",
                   help="the largest micro-batch / packed row / frames that fit: auto (default) below the configured "
                        "ones when the run does not fit; up: also above them (to 4x) when it fits; off")
    p.add_argument("--loader", choices=["on", "off"], default="on",
                   help="with a GPU's step time, time the planned micro-batch's samples through the loader on one "
                        "core and say whether the workers keep the GPU fed (default on)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    p.set_defaults(func=_plan)


def _add_data_commands(sub: Any) -> None:
    """demo, make-data, make-tiny: the commands that make a demo, a dataset or a model."""
    p = sub.add_parser("demo", help="tiny SmolVLM + synthetic data + DeepSpeed training + evaluation, on CPU")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default: 2)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    p.add_argument("--zero", type=int, choices=[2, 3], default=2, help="ZeRO stage (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=float, default=0.0, metavar="SHARE",
                   help="share of the image and video records that ask for a caption sentence, scored by BLEU-4, "
                        "ROUGE-L and CIDEr too (default 0)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("make-data", help="write the synthetic ball/tone dataset (mp4, png, wav, JSONL)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=float, default=0.0, metavar="SHARE",
                   help="share of the image and video records that ask for a caption sentence, with "
                        "'references' (default 0)")
    p.set_defaults(func=_make_data)

    p = sub.add_parser("make-tiny", help="save a tiny random model + offline processor to a folder")
    p.add_argument("family", help="the model family: smolvlm, smolvlm2, llava_onevision, llava_onevision_1_5 "
                                     "(docs/families.md)")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)


def _default_accelerator() -> None:
    if "DS_ACCELERATOR" in os.environ:
        return
    try:
        import torch
    except ImportError:  # `hpc-train doctor` says so; nothing else runs without torch
        return
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    from hpc_train.extensions import use_environment_extensions_dir

    args = build_parser().parse_args(argv)
    if args.command != "download":
        # Never reach a model hub during a run: every model comes from a folder, the local cache
        # or a preset (read before huggingface_hub is imported: it reads this once).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _default_accelerator()
    use_environment_extensions_dir()
    # torch.distributed deprecation notices raised inside DeepSpeed: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    try:
        return args.func(args)
    except HpcTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The command line (``hpc-train``, ``python -m hpc_train``): :func:`main`'s exit status. A
    process that joined a process group exits at once, without the interpreter's teardown: torn
    down at exit, the process group's threads (still referenced from DeepSpeed's engine) now and
    then abort the process (status -6) after a run that had finished and written everything,
    and the launcher would report the job as failed."""
    from hpc_train.env_file import restore_environment

    restore_environment()  # values a launcher could not pass whole (launch/deepspeed.sh), before any use
    status = main()
    dist = sys.modules.get("hpc_train.dist")
    if dist is None or not dist.joined:
        sys.exit(status)
    mpi = sys.modules.get("mpi4py.MPI")  # ranks started by mpirun (topology from mpi4py)
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun counts a rank that skips it as failed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
