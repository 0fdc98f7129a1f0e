"""The image processors transformers ships for our families: its default torchvision backend
(the "fast" processors, which transformers 5 loads unless told otherwise) against the PIL one
(``<Name>ImageProcessorPil``, the former "slow" processors), built from the same settings: time
per image on one core, and how far their outputs are apart.

Each family's published processor settings (the preset's); the input is a 1024x768 photo-like
image (a gradient with noise, saved and read back as JPEG) and a 4:3 portrait one, as a sample
holds them. Arms run interleaved round by round; the median is quoted.

    python benchmarks/processors.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc_train.models.tiny import preset_processor  # noqa: E402

PRESETS = {"smolvlm": "smolvlm-256m", "smolvlm2": "smolvlm2-256m", "llava_onevision": "llava-onevision-0.5b",
           "llava_onevision_1_5": "llava-onevision-1.5-4b"}


def photo(width: int, height: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 12, (height, width, 1)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).copy()).save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def pil_twin(fast: Any) -> Any:
    """The PIL-backend processor of ``fast``'s class, with ``fast``'s settings."""
    import transformers

    twin = getattr(transformers, type(fast).__name__ + "Pil")
    settings = {k: v for k, v in fast.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return twin(**settings)


def outputs(processor: Any, images: list[Any]) -> dict[str, np.ndarray]:
    out = processor(images=images, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def compare(fast_out: dict[str, np.ndarray], pil_out: dict[str, np.ndarray]) -> str:
    said = []
    for key, value in fast_out.items():
        theirs = pil_out.get(key)
        if theirs is None or theirs.shape != value.shape:
            said.append(f"{key}: shape {value.shape} vs {None if theirs is None else theirs.shape}")
        elif value.dtype.kind == "f":
            gap = np.abs(value.astype(np.float64) - theirs.astype(np.float64))
            said.append(f"{key}: max {gap.max():.3f}, mean {gap.mean():.4f}")
        elif not np.array_equal(value, theirs):
            said.append(f"{key}: differ")
    return "; ".join(said) or "equal"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(1)
    images = [photo(1024, 768, 0), photo(768, 1024, 1)]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, one thread; "
          "an image: 1024x768 and 768x1024, each alone")
    print(f"{'family':22s} {'processor':32s} {'torchvision ms':>15s} {'PIL ms':>8s} {'PIL/tv':>7s}  outputs (PIL vs tv)")
    for family, preset in PRESETS.items():
        fast = preset_processor(preset).image_processor
        pil = pil_twin(fast)
        times: dict[str, list[float]] = {"tv": [], "pil": []}
        for processor in (fast, pil):
            outputs(processor, [images[0]])  # warm
        for _ in range(args.rounds):
            for arm, processor in (("tv", fast), ("pil", pil)):
                start = time.perf_counter()
                for image in images:
                    outputs(processor, [image])
                times[arm].append((time.perf_counter() - start) / len(images) * 1000)
        said = compare(outputs(fast, [images[0]]), outputs(pil, [images[0]]))
        tv, slow = statistics.median(times["tv"]), statistics.median(times["pil"])
        print(f"{family:22s} {type(fast).__name__:32s} {tv:15.1f} {slow:8.1f} {slow / tv:6.2f}x  {said}")


if __name__ == "__main__":
    main()
