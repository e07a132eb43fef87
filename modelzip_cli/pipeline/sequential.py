"""Layer-by-layer calibration: a model's repeated blocks (a decoder's or encoder's layers) taken one at a
time, each calibrated on the outputs of the blocks before it as they are after compression.

Memory holds the model, one block's statistics and the activations of one block boundary for the
calibration set, never every layer's inputs at once. The inputs of the first block are caught by a
forward pre-hook that stops the model there; every later block takes the previous block's outputs with
the same keyword arguments (attention mask, position embeddings). A model with no such stack is
calibrated in one whole-model pass instead (`blocks_of` returns None and the caller says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from modelzip_cli.nn.decoders import Blocks, blocks_of  # noqa: F401  (the stack of blocks, found in nn/)


class _Caught(Exception):
    """Raised by the pre-hook on the first block: the model need not run past it."""


Entry = tuple[tuple, dict]  # one calibration batch's block arguments: positional and keyword


class Offloaded:
    """A block boundary's activations kept in files (`--offload-activations DIR`): each calibration batch's
    hidden states in one safetensors file of a folder modelzip made (and removes), the batch's other
    arguments (attention mask, position embeddings: the same for every block) in memory. Read back one batch
    at a time, so memory holds one batch's hidden states instead of the whole calibration set's."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: list[tuple[Path, str, tuple | None, dict]] = []

    def append(self, entry: Entry) -> None:
        from safetensors.torch import save_file

        args, kwargs = entry
        states = args[0] if args else kwargs["hidden_states"]
        path = self.folder / f"{next(_FILES)}.safetensors"
        save_file({"hidden_states": states.detach().contiguous()}, str(path))
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.entries.append((path, str(states.device), args[1:] if args else None, rest))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Entry:
        from safetensors.torch import load_file

        path, device, rest, kwargs = self.entries[i]
        states = load_file(str(path), device=device)["hidden_states"]
        return ((states, *rest), kwargs) if rest is not None else ((), {**kwargs, "hidden_states": states})

    def __iter__(self) -> Iterator[Entry]:
        return (self[i] for i in range(len(self)))

    def like(self) -> Offloaded:
        """An empty boundary in the same folder (the next block's inputs)."""
        return Offloaded(self.folder)

    def drop(self) -> None:
        for path, *_ in self.entries:
            path.unlink(missing_ok=True)
        self.entries.clear()


_FILES = itertools.count()
Inputs = list[Entry] | Offloaded  # per calibration batch: the block's positional and keyword arguments


def _is_cache(value: object) -> bool:
    """A transformers KV cache (GPT-2 passes it positionally)."""
    return callable(getattr(value, "get_seq_length", None))


def _clean(kwargs: dict) -> dict:
    """A block's keyword arguments without a KV cache: calibration passes must not grow one."""
    out = dict(kwargs)
    for key in ("past_key_values", "past_key_value", "cache"):  # transformers 5 calls it `cache`
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.inference_mode()
def first_inputs(model: nn.Module, blocks: Blocks, batches: Iterable, forward: Callable,
                 folder: Path | None = None) -> Inputs:
    """The arguments the first block receives for each calibration batch (`forward(model, batch)` runs the
    model); kept in files under `folder` when one is given (`Offloaded`)."""
    seen: Inputs = Offloaded(folder) if folder is not None else []

    def catch(module, args, kwargs):
        seen.append((tuple(a.detach() if isinstance(a, torch.Tensor) else None if _is_cache(a) else a for a in args),
                     _clean(kwargs)))
        raise _Caught

    handle = blocks.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Caught:
                pass
    finally:
        handle.remove()
    return seen


def hidden(out) -> torch.Tensor:
    """A block's hidden states, from what it returns (a tensor, or a tuple that starts with them)."""
    return out[0] if isinstance(out, tuple | list) else out


def first_sample(entry: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """One calibration batch's block arguments cut to its first sample: every tensor of two or more dimensions
    whose first is the batch's (the hidden states', or the keywords' hidden states') is sliced to 1."""
    args, kwargs = entry
    states = args[0] if args else kwargs.get("hidden_states")
    n = states.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == n:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


@torch.inference_mode()
def run_block(block: nn.Module, inputs: Inputs) -> Inputs:
    """The next block's arguments: this block's outputs in place of the hidden states, same keywords (in
    files beside the inputs' when they are offloaded). The inputs are used up: a list gives each batch's
    entry up as its output is made, so memory holds one boundary and a batch, not two boundaries."""
    nxt: Inputs = inputs.like() if isinstance(inputs, Offloaded) else []
    for i in range(len(inputs)):
        args, kwargs = inputs[i]
        if not isinstance(inputs, Offloaded):
            inputs[i] = None  # the batch's hidden states go as soon as the block has read them
        if args:
            out = hidden(block(*args, **kwargs))
            nxt.append(((out, *args[1:]), kwargs))
        else:
            out = hidden(block(**kwargs))
            nxt.append(((), {**kwargs, "hidden_states": out}))
    return nxt


@torch.inference_mode()
def feed(block: nn.Module, inputs: Inputs) -> None:
    """Run the block on every batch for what its hooks record, keeping none of its outputs."""
    for args, kwargs in inputs:
        block(*args, **kwargs)


@contextlib.contextmanager
def activations_folder(offload: Path | None) -> Iterator[Path | None]:
    """A fresh folder under `offload` for one calibration's block boundaries, removed afterwards whatever
    happens (None without --offload-activations)."""
    if offload is None:
        yield None
        return
    with tempfile.TemporaryDirectory(dir=offload, prefix="modelzip-activations-") as folder:
        yield Path(folder)


def calibrate(model: nn.Module, batches: list, forward: Callable,
              per_block: Callable[[int, nn.Module, Inputs], None],
              progress: Callable[[int, int], None] | None = None, through_last: bool = True,
              offload: Path | None = None) -> Blocks | None:
    """Run `per_block(i, block, inputs)` on each block in order, then pass the inputs through the block as
    `per_block` left it (not through the last one unless `through_last`: nothing may need its outputs).
    `offload`: a folder the block boundaries' activations are kept in, one batch in memory at a time.
    Returns the stack, or None when the model has none (nothing was run)."""
    blocks = blocks_of(model)
    if blocks is None:
        return None
    with activations_folder(offload) as folder:
        inputs = first_inputs(model, blocks, batches, forward, folder)
        for i, block in enumerate(blocks.layers):
            per_block(i, block, inputs)
            give_back_freed_memory()  # the statistics pass's and the method's temporaries, before the outputs'
            if through_last or i + 1 < len(blocks.layers):
                done, inputs = inputs, run_block(block, inputs)
                if isinstance(done, Offloaded):
                    done.drop()
            give_back_freed_memory()
            if progress is not None:
                progress(i + 1, len(blocks.layers))
    return blocks


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim`; elsewhere nothing). Each block pass
    frees its activations and kernels' temporaries, and glibc keeps freed pages resident: over a 30-block
    decoder's calibration that grew the resident size by 0.8 GB (bench `scale`, W8A8 dynamic of the
    135M-class decoder, peak 2.2 GB; 1.7 GB with this)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model moved to `device` (--device) for a calibration step, and back where it was afterwards, even
    on an error: the step's passes, Hessians and updates all run where its weights are."""
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    if home == torch.device(device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def forward(model: nn.Module, x: torch.Tensor) -> object:
    return model(x)


def calibration_batches(model: nn.Module, data, batches: int, batch_size: int) -> list[torch.Tensor]:
    """The first `batches` batches of a calibration dataset, where the model is."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return [x.to(device) for i, (x, _, _) in enumerate(data.batches(batch_size)) if i < batches]


# Token positions one block pass takes at once: a few small batches cost more than one (the sample decoder's
# 128 windows of 128 tokens: 4 passes of 32, not 16 of 8), and no more than 8 windows of 512 (what the memory
# bench's 24-block decoder of hidden 1024 ran with before), so a pass's activations do not grow there.
PASS_TOKENS = 4096
# ... and no more than make PASS_BYTES of the block's widest Linear output (float32): a pass's temporaries are a
# few such tensors. The 24-block decoder of hidden 1024 (intermediate 2816): 2048 positions a pass, its swing in
# resident memory about 250 MB instead of 500 (bench `scale`, GPTQ); the sample decoder keeps 4096.
PASS_BYTES = 24 << 20


def pass_tokens(block: nn.Module) -> int:
    """Token positions a calibration pass through `block` takes at once (PASS_TOKENS, PASS_BYTES)."""
    widest = max((m.weight.shape[0] for m in block.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2), default=1)
    return max(1, min(PASS_TOKENS, PASS_BYTES // (4 * widest)))


def rebatched(batches: list[torch.Tensor], tokens: int = PASS_TOKENS) -> list[torch.Tensor]:
    """The same samples in batches of about `tokens` positions (token windows of one length; other inputs,
    and windows of mixed lengths, as they are). Statistics summed over samples do not depend on the
    batching, and a block pass over a few large batches runs faster than over many small ones."""
    if not batches or any(b.is_floating_point() or b.shape[1:] != batches[0].shape[1:] for b in batches):
        return batches
    # (B, L) ids, or (B, 2, L) ids with their attention mask: L positions a sample
    per = max(1, tokens // max(1, batches[0].shape[-1]))  # samples per batch
    return list(torch.cat(batches).split(per))


class Hessians:
    """Forward hooks that add each named Linear's inputs to its Hessian (gptq.Hessian). Linears fed the very
    same tensor (q, k and v; gate and up) share one Hessian, added to once per forward of `root`."""

    def __init__(self, root: nn.Module, layers: dict[str, nn.Module]):
        self.of: dict[str, Hessian] = {}
        self.current: list[tuple[torch.Tensor, Hessian]] = []  # this forward's inputs, kept alive to compare
        self.handles = [root.register_forward_pre_hook(lambda *_: self.current.clear())]
        self.handles += [layer.register_forward_pre_hook(lambda m, args, n=n: self._seen(n, args[0]))
                         for n, layer in layers.items()]

    def _seen(self, name: str, x: torch.Tensor) -> None:
        for seen, h in self.current:
            if seen is x:
                self.of.setdefault(name, h)
                return
        h = self.of.setdefault(name, Hessian(x.shape[-1], x.device))
        h.add(x)
        self.current.append((x, h))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.current.clear()


BY_BLOCK = True  # False: per_layer calibrates in one whole-model pass (the bench's baseline for block by block)


def _feed_model(model: nn.Module, batches: list[torch.Tensor]) -> None:
    for x in batches:  # outputs dropped as they come (a vocabulary's logits per batch)
        forward(model, x)


Process = Callable[[list[str], list[nn.Module], "Hessian"], None]  # layers that read one input, its Hessian


def per_layer(model: nn.Module, names: list[str], batches: list[torch.Tensor], process: Process, progress,
              label: str, offload: Path | None = None,
              finished: Callable[[list[str]], None] | None = None) -> str:
    """Accumulate each named layer's input Hessian on the calibration batches and hand it to
    `process(names, layers, hessian)` (the layers that read the very same input together, in `names` order),
    which changes the layers in place: block by block, each block on the outputs of the blocks before it as
    `process` left them; layers outside the stack (or every layer, when the model has none) in one whole-model
    pass at the end. Layers no batch reached are not processed. Returns how it ran, for the notes.

    `finished(names)`: called with a block's processed layers once nothing will run them again during the
    calibration (after the next block's inputs are made, when no layer outside the stack needs the whole
    model afterwards): the caller may replace them then (GPTQ puts its packed int4 layers in, so the float
    weights go block by block instead of staying to the end)."""

    def run(root: nn.Module, layer_names: list[str], feed: Callable[[], object]) -> list[str]:
        """Process the named layers that `feed` reached; returns their names."""
        layers = {n: model.get_submodule(n) for n in layer_names}
        hessians = Hessians(root, layers)
        try:
            with torch.inference_mode():
                feed()
        finally:
            hessians.remove()
        shared: dict[int, list[str]] = {}  # id(Hessian) → the layers that read its input
        for n in layers:
            if n in hessians.of:
                shared.setdefault(id(hessians.of[n]), []).append(n)
        for group in shared.values():
            with torch.no_grad():
                process(group, [layers[n] for n in group], hessians.of[group[0]])
        return [n for group in shared.values() for n in group]

    stack = blocks_of(model) if BY_BLOCK else None
    batches = rebatched(batches, pass_tokens(stack.layers[0]) if stack is not None else PASS_TOKENS)
    done: set[str] = set()
    with progress(label, (len(stack.layers) if stack else 0) + 1) as bar:
        if stack is not None:
            outside = any(not n.startswith(stack.prefix + ".") for n in names)  # needs the whole model after
            processed: dict[int, list[str]] = {}  # block → its layers processed, until its outputs are made

            def per_block(i: int, block: nn.Module, inputs: Inputs) -> None:
                mine = [n for n in names if n.startswith(stack.name(i) + ".")]
                processed[i] = run(block, mine, lambda: feed(block, inputs))
                done.update(mine)

            def past(blocks_done: int, _total: int) -> None:  # the block's outputs are made (or not needed)
                bar.advance()
                layers = processed.pop(blocks_done - 1)
                if finished is not None and not outside:
                    finished(layers)

            calibrate(model, batches, forward, per_block, progress=past, through_last=outside, offload=offload)
        rest = [n for n in names if n not in done]
        if rest:
            run(model, rest, lambda: _feed_model(model, batches))
        bar.advance()
    if stack is None:
        return "in one whole-model pass (no stack of repeated blocks found)"
    return f"layer by layer over the {len(stack.layers)} blocks of {stack.prefix}"


class Hessian:
    """H = 2/n · Σ xᵀx over every input row seen, kept as a running mean (float32, on the input's device)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(columns, columns, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        n = x.shape[0]
        self.h.mul_(self.rows / (self.rows + n))
        self.rows += n
        self.h.addmm_(x.T, x, alpha=2 / self.rows)  # no scaled copy of x
