"""`modelzip data text|images`: data files from text or image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzip_cli.cli.options import (
    HELP_OPTIONS,
    Force,
    Quiet,
    Seed,
    _console,
)
from modelzip_cli.errors import UsageError

data_app = typer.Typer(no_args_is_help=True, context_settings=HELP_OPTIONS,
                       help="Make data files: token ids from text, tensors from images.")



DataOutput = Annotated[Path, typer.Option("--output", "-o", help="the data file (.safetensors)")]



Split = Annotated[float | None, typer.Option("--split", help="training fraction: writes OUT.train and OUT.test "
                                             "(stratified by class for images)")]



def _written(written, quiet: bool) -> None:
    if not quiet:
        for path, n in zip(written.paths, written.samples, strict=True):
            extra = f", {len(written.classes)} classes" if written.classes else ""
            _console().print(f"{path}: {n:,} samples of shape {written.shape}{extra}")



@data_app.command("text")
def data_text(
    corpus: Annotated[Path, typer.Argument(help="a UTF-8 text file, one sample per line", show_default=False)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="the model directory holding the tokenizer")],
    output: DataOutput,
    max_length: Annotated[int, typer.Option("--max-length", help="tokens per sample (padded or cut)")] = 128,
    pack: Annotated[bool, typer.Option("--pack", help="language-model windows: documents (the file, each file "
                                       "of a folder, or each line of a .jsonl) joined with EOS and cut into "
                                       "--max-length windows; --split divides documents")] = False,
    split: Split = None, seed: Seed = 0, force: Force = False, quiet: Quiet = False,
) -> None:
    """Token ids and attention masks from text, with a model's own tokenizer (offline)."""
    from modelzip_cli.commands import data as datamake

    make = datamake.packed_text if pack else datamake.text
    _written(make(corpus, tokenizer, output, max_length=max_length, split=split, seed=seed, force=force), quiet)



@data_app.command("images")
def data_images(
    folder: Annotated[Path, typer.Argument(help="one subfolder of images per class", show_default=False)],
    output: DataOutput,
    size: Annotated[int, typer.Option("--size", help="side of the square each image is resized to")] = 224,
    mean: Annotated[str | None, typer.Option("--mean", help="R,G,B means (default ImageNet's)")] = None,
    std: Annotated[str | None, typer.Option("--std", help="R,G,B standard deviations (default ImageNet's)")] = None,
    split: Split = None, seed: Seed = 0, force: Force = False, quiet: Quiet = False,
) -> None:
    """Normalised image tensors and class labels from an image folder (ImageFolder layout)."""
    from modelzip_cli.commands import data as datamake

    def triple(text: str | None, default: tuple, flag: str) -> tuple:
        if text is None:
            return default
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{flag} takes three numbers, e.g. {','.join(map(str, default))}") from None

    _written(datamake.images(folder, output, size=size, mean=triple(mean, datamake.IMAGENET_MEAN, "--mean"),
                             std=triple(std, datamake.IMAGENET_STD, "--std"), split=split, seed=seed, force=force),
             quiet)
