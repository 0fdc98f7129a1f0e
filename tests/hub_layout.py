"""A saved tiny LLaVA-OneVision-1.5 rewritten in the file layout of the published folder
(lmms-lab/LLaVA-OneVision-1.5-*-Instruct), so tests load, check, train and evaluate what a user
downloads: ``config.json`` with the remote code's ``auto_map`` (and that code present, raising if
anything ever runs it), the processor settings in ``preprocessor_config.json`` (Qwen2.5-VL's, which
the video processor reads too), ``chat_template.json``, and the weights in two shards with their
index.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

REMOTE_CODE = ("configuration_llavaonevision1_5.py", "modeling_llavaonevision1_5.py")
AUTO_MAP = {"AutoConfig": "configuration_llavaonevision1_5.Llavaonevision1_5Config",
            "AutoModel": "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"}


def published_layout(folder: Path) -> Path:
    """Rewrite ``folder`` (written by ``save_pretrained``) in place; returns it."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}, indent=2))
    for name in REMOTE_CODE:
        (folder / name).write_text("raise RuntimeError('the checkpoint folder's remote code was executed')\n")
    saved = json.loads((folder / "processor_config.json").read_text())
    image = saved["image_processor"]
    low, high = image["size"]["shortest_edge"], image["size"]["longest_edge"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": low, "max_pixels": high, "patch_size": image["patch_size"],
        "temporal_patch_size": image["temporal_patch_size"], "merge_size": image["merge_size"],
        "image_mean": image["image_mean"], "image_std": image["image_std"],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (folder / "processor_config.json").unlink()
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _two_shards(folder)
    return folder


def _two_shards(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({name: tensors[name].contiguous() for name in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
