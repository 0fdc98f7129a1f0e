"""The ``hpc-train`` command: train, eval, cache-vision, prepare-media, plan, demo, doctor,
make-data, make-tiny, check-data, show-config, download, convert-proassist, topology."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hpc_train.errors import ConfigError, HpcTrainError


def _make_data(args: argparse.Namespace) -> int:
    from hpc_train.data.synthetic import SyntheticSpec, make_dataset

    spec = SyntheticSpec(n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    summary = make_dataset(args.out, spec)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from hpc_train.models.tiny import save_tiny

    out = save_tiny(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} model and processor saved to {out}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from hpc_train.check_data import audit_dataset, format_report
    from hpc_train.config_file import load_config

    config = load_config(args.config, args.overrides)
    report = audit_dataset(config, split=args.split, limit=args.limit)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else 1


def _train(args: argparse.Namespace) -> int:
    from hpc_train.config_file import load_config
    from hpc_train.dist import cleanup
    from hpc_train.train.run import PeerLost, run
    from hpc_train.train.trainer import TrainingStopped

    config = load_config(args.config, args.overrides)
    try:
        return run(config, evaluate_only=args.command == "eval")
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


def _download(args: argparse.Namespace) -> int:
    from hpc_train.models.hub import HubId, download

    hub_id = HubId.parse(args.repo)
    if hub_id is None:
        raise ConfigError(f"{args.repo}: not a hub id. Fix: name it as org/name or org/name@revision "
                          "(e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")
    got = download(hub_id, repo_type=args.repo_type, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(f"{hub_id.repo} at commit {got.commit} is in {got.folder}")
    if args.repo_type == "model":
        print(f"use it as model.path={got.pinned(args.repo)} (pinned) or model.path={hub_id} (whatever the cache "
              "holds for it)")
    else:
        print(f"point data.train at its JSON / JSONL file there (data.train={got.folder}/<file>; media paths "
              "resolve against the file's folder)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hpc_train.demo import run_demo

    return run_demo(args.out, nproc=args.nproc, steps=args.steps, zero=args.zero, seed=args.seed)


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    from hpc_train.config_file import describe_keys, load_config

    if args.keys:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, text in describe_keys():
            print(f"| `{key}` | `{default}` | {text} |")
        return 0
    config = load_config(args.config, args.overrides)
    if args.get:
        for key in args.get:  # one line each, in the order asked
            value: object = config.to_dict()
            for part in key.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(f"--get {key}: no such key. Fix: see hpc-train show-config --keys")
                value = value[part]
            print(value if not isinstance(value, dict | list) else yaml.safe_dump(value, sort_keys=False), end="\n")
        return 0
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _topology(args: argparse.Namespace) -> int:
    import socket

    from hpc_train.dist import read_dist_env

    info = read_dist_env()
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"topology on {host}: {info.describe()}", flush=True)
    if args.check:
        import torch
        import torch.distributed as dist

        from hpc_train.device import choose_device
        from hpc_train.dist import init_distributed

        device = choose_device(info)  # NCCL: each rank its own GPU, tensors on it
        init_distributed(info, device, timeout_s=args.timeout)
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        hosts: list[object] = [None] * info.world_size
        dist.all_gather_object(hosts, host)
        if int(total.item()) != info.world_size:
            raise ConfigError(f"all_reduce over {info.world_size} ranks gave {int(total.item())}")
        if info.is_main:
            print(f"process group OK: {info.world_size} ranks on {len(set(hosts))} node(s): "
                  f"{', '.join(sorted(set(map(str, hosts))))}", flush=True)
        dist.destroy_process_group()
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from hpc_train.doctor import (
        Check,
        RunNeeds,
        blockers,
        format_table,
        needs_of_config,
        run_checks,
        write_json,
    )

    needs = RunNeeds(Path(args.output_dir or "."))
    unread: list[Check] = []
    if args.config is not None:
        try:
            needs = needs_of_config(args.config, args.overrides, args.output_dir)
        except ImportError as exc:  # the config itself needs packages this environment lacks
            unread.append(Check("config", "fail", f"{args.config}: not read", f"{exc}"))
    checks = [*unread, *run_checks(needs, min_free_gib=args.min_free_gib)]
    print(format_table(checks), flush=True)
    if args.json:
        write_json(checks, args.json)
    return 1 if blockers(checks) else 0


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


def _convert_proassist(args: argparse.Namespace) -> int:
    from hpc_train.data.proassist import convert_proassist

    written = convert_proassist(args.input, args.output, max_turns=args.max_turns)
    print(f"{written} records written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_run_commands(sub: Any) -> None:
    """train, eval, demo, make-data, make-tiny: the commands that make or train something."""
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

    p = sub.add_parser("demo", help="tiny SmolVLM + synthetic data + DeepSpeed training + evaluation, on CPU")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default: 2)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    p.add_argument("--zero", type=int, choices=[2, 3], default=2, help="ZeRO stage (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("make-data", help="write the synthetic ball/tone dataset (mp4, png, wav, JSONL)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_data)

    p = sub.add_parser("make-tiny", help="save a tiny random model + offline processor to a folder")
    p.add_argument("family", help="the model family: smolvlm, smolvlm2, llava_onevision, llava_onevision_1_5 "
                                     "(README: Model families)")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)


def _add_tool_commands(sub: Any) -> None:
    """show-config, topology, doctor, download, convert-proassist, check-data: the commands that
    inspect or fetch."""
    p = sub.add_parser("show-config", help="print the resolved config, or every key with --keys")
    p.add_argument("config", nargs="?", default=None, help="YAML config or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--get", metavar="KEY", action="append",
                   help="print only this key's value (e.g. output_dir); repeat for several, one per line")
    p.set_defaults(func=_show_config)

    p = sub.add_parser("topology", help="print this process's rank / world / master as the launcher gave them")
    p.add_argument("--check", action="store_true", help="also join the process group and all_reduce across it")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the other ranks (--check)")
    p.set_defaults(func=_topology)

    p = sub.add_parser("doctor", help="check this machine before a long job (versions against the tested pins, "
                                      "GPUs, kernels, launchers, output folder); exit 1 on a blocker")
    p.add_argument("config", nargs="?", default=None, help="the run's config (its output_dir, mode, DeepSpeed "
                                                           "config); without one only the machine is checked")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--output-dir", default=None, help="the folder the run writes to (default: the config's "
                                                      "output_dir, else the current folder)")
    p.add_argument("--min-free-gib", type=float, default=2.0, help="free disk below this is a blocker (default 2)")
    p.add_argument("--json", default=None, help="also write the checks as JSON to this file")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("download", help="fetch a model (or dataset) repo from the Hugging Face Hub into the local "
                                        "cache runs read offline (on a node with internet)")
    p.add_argument("repo", help="org/name or org/name@revision (branch, tag or commit)")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--cache-dir", default=None, help="the cache to fill (default: HF_HUB_CACHE, else HF_HOME/hub)")
    p.set_defaults(func=_download)

    p = sub.add_parser("convert-proassist", help="convert ProAssist-style dialogs to LLaVA JSONL")
    p.add_argument("input", help="ProAssist dialogs (JSON or JSONL)")
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--max-turns", type=int, default=None,
                   help="split dialogs into windows of at most this many assistant turns")
    p.set_defaults(func=_convert_proassist)

    p = sub.add_parser("check-data", help="audit a dataset as it would be trained")
    p.add_argument("config", help="YAML config or shipped recipe name (e.g. tiny_smolvlm)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--limit", type=int, default=None, help="check only the first N records")
    p.add_argument("--json", default=None, help="also write the audit as JSON to this file")
    p.set_defaults(func=_check_data)


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
