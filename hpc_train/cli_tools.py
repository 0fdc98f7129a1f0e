"""``hpc-train``'s commands that inspect or fetch: show-config, topology, doctor, download,
convert-proassist, check-data."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from hpc_train.errors import ConfigError


def _check_data(args: argparse.Namespace) -> int:
    from hpc_train.check_data import audit_dataset, format_report
    from hpc_train.config_file import load_config

    config = load_config(args.config, args.overrides)
    report = audit_dataset(config, split=args.split, limit=args.limit)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else 1


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


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    from hpc_train.config_file import describe_keys, load_config

    if args.reference:
        from hpc_train.config_reference import render_reference

        print(render_reference(), end="")
        return 0
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




def _convert_proassist(args: argparse.Namespace) -> int:
    from hpc_train.data.sources.proassist import convert_proassist

    written = convert_proassist(args.input, args.output, max_turns=args.max_turns)
    print(f"{written} records written to {args.output}")
    return 0


def add_tool_commands(sub: Any) -> None:
    """show-config, topology, doctor, download, convert-proassist, check-data: the commands that
    inspect or fetch."""
    p = sub.add_parser("show-config", help="print the resolved config, or every key with --keys")
    p.add_argument("config", nargs="?", default=None, help="YAML config or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--reference", action="store_true",
                   help="print the configuration reference page (docs/configuration.md: every key's type, default "
                        "and meaning, by section)")
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
