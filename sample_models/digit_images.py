"""The digits as small RGB images, for convolutional nets: each 8×8 digit written as a PNG in a folder per
class, then read back by `modelzip data images --size 32` (bilinear upscaling, three channels, ImageNet
normalisation), so the sample CNN sees exactly what a user's ImageFolder gives it.

    python -m sample_models.digit_images test OUT.safetensors [LIMIT]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SIZE = 32


def write(split: str, output: Path, limit: int | None = None, size: int = SIZE) -> Path:
    """digits_{split}.safetensors (the first `limit` samples) as an image data file at `output`."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from modelzip_cli.commands import data as datamake

    d = load_file(str(HERE / f"digits_{split}.safetensors"))
    x, y = d["inputs"][:limit], d["targets"][:limit]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            folder = Path(tmp) / f"digit{int(label)}"
            folder.mkdir(exist_ok=True)
            gray = (pixels.reshape(8, 8).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(gray, mode="L").save(folder / f"{i:05d}.png")
        datamake.images(Path(tmp), output, size=size, force=True)
    return output


if __name__ == "__main__":
    write(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
