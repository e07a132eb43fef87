"""Runs launched by torchrun: the process group, ranks, devices, sharded collectives, one outcome for all.

modelzip never starts processes itself. `torchrun --nproc-per-node N -m modelzip_cli COMMAND …` starts N
copies of the same command and gives each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Every
rank loads the same inputs and runs the same code; the training loop (train.py) wraps the model in
DistributedDataParallel and gives each rank its part of every batch; rank 0 alone writes the checkpoint,
the report and the summary; `run_on_every_rank` makes every rank end with the same exit code and one line.

Without those variables everything here answers as for one process (rank 0 of 1) and does nothing.
torch is imported inside the functions: `launched()` is asked before any command runs, and
`modelzip --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from modelzip_cli.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a rank that failed waits for the others to report before it says why on its own: long enough
# for ranks that fail at the same point (the same bad input) to arrive, short enough not to keep a
# failure waiting on ranks that are still training (torchrun stops those once this one exits).
FAILED_RANK_WAIT = timedelta(seconds=5)
# A rank that succeeded waits for rank 0 to measure, write and report; torchrun stops it if rank 0 dies.
FINISHED_RANK_WAIT = timedelta(hours=24)


def launched() -> bool:
    """Started by torchrun (or any launcher that sets torch.distributed's environment variables)."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def _group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group_up() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _group_up() else 1


def is_main() -> bool:
    """Rank 0, the one that writes files and prints (also true when not distributed)."""
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Devices


def resolve_device(spec: str) -> torch.device:
    """`--device cpu|cuda|cuda:N|auto` → a torch.device, checked now (exit 2 naming what is missing).

    Under torchrun, `cuda` (and `auto` with CUDA) means cuda:LOCAL_RANK: one GPU per process."""
    import torch

    text = spec.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise UsageError(f"--device {spec}: this torch build ({torch.__version__}) has no CUDA support",
                             hint="install a CUDA build of torch, or pass --device cpu")
        raise UsageError(f"--device {spec}: torch {torch.__version__} is built for CUDA {torch.version.cuda} but "
                         "sees no CUDA device", hint="check the NVIDIA driver and CUDA_VISIBLE_DEVICES, "
                                                     "or pass --device cpu")
    count = torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1
    if match.group(1) is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0
        if index >= count:
            raise UsageError(f"--device cuda: this process is local rank {index} but the node has {count} CUDA "
                             "device(s)", hint=f"launch at most {count} processes per node (--nproc-per-node)")
    else:
        index = int(match.group(1))
        if per_node > 1:
            raise UsageError(f"--device {spec} names one GPU for {per_node} processes on this node",
                             hint="pass --device cuda: each process then takes cuda:LOCAL_RANK")
        if index >= count:
            raise UsageError(f"--device {spec}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # NCCL's communicators use the current device
    return device


def backend(device: torch.device) -> str | None:
    """The backend that carries this device's tensors between ranks; None for one process."""
    if world_size() == 1:
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def runtime(device: torch.device) -> dict:
    """What the report records about where the run ran."""
    return {"device": str(device), "world_size": world_size(), "backend": backend(device)}


# --------------------------------------------------------------------------------------------------
# Collectives (each is a no-op for one process)


def shard(n: int, of_rank: int | None = None) -> tuple[int, int]:
    """[start, end) of `of_rank`'s (default: this rank's) contiguous part of n rows; sizes differ by ≤ 1."""
    r, w = (rank() if of_rank is None else of_rank), world_size()
    return r * n // w, (r + 1) * n // w


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; afterwards it is bitwise identical on every rank."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(part: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `part` (its `shard(n)` rows), concatenated in rank order on every rank: (n, …)."""
    import torch
    import torch.distributed as dist

    w = world_size()
    if w == 1:
        return part
    size = -(-n // w)  # all_gather needs equal sizes: pad each part to the largest
    padded = torch.zeros((size, *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[: part.shape[0]] = part
    gathered = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: shard(n, r)[1] - shard(n, r)[0]] for r, g in enumerate(gathered)])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when there are several ranks (gradients averaged over ranks in
    backward), else `model` itself. The graph is static (every step uses the same parameters): DDP then
    learns in the first step which parameters the loss does not reach (a Hugging Face pooler the compared
    output ignores) instead of failing on them, and searches for them in no later step."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


# --------------------------------------------------------------------------------------------------
# One run, many processes: start, and end with one exit code and one line


def _init_process_group() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # gloo carries CPU tensors; NCCL, where this build has it and a GPU is visible, carries CUDA tensors.
    # Which one a run uses follows --device, which is parsed later, so both are set up (lazily: NCCL's
    # communicators are created at the first CUDA collective).
    nccl = dist.is_nccl_available() and torch.cuda.is_available()
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if nccl else "gloo")


def _status_store():
    """A key-value client on the rendezvous store torchrun set up (MASTER_ADDR:MASTER_PORT). Exit codes go
    through it rather than through a collective: a rank that failed mid-training must not post a
    collective that its peers, still inside a gradient all-reduce, would mistake for their own."""
    import torch.distributed as dist

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=60))
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"modelzip/{run}/", client)


def _post_and_collect(store, code: int, line: str | None) -> tuple[int, list[dict] | None]:
    """Post this rank's outcome. Returns the order in which this rank failed (1 = first of the run; 0 if it
    did not fail) and every rank's outcome in rank order, or None if some did not post in time."""
    import json

    w = world_size()
    try:
        order = int(store.add("failures", 1)) if code else 0  # an atomic counter: who failed first
        store.set(f"outcome/{rank()}", json.dumps({"code": code, "line": line, "order": order}))
    except Exception:  # the store's host is gone: so is the run
        return (1 if code else 0), None
    try:
        store.wait([f"outcome/{r}" for r in range(w)], FAILED_RANK_WAIT if code else FINISHED_RANK_WAIT)
        return order, [json.loads(store.get(f"outcome/{r}")) for r in range(w)]
    except Exception:  # timed out (the others are still training), or the store's host is gone
        return order, None


def run_on_every_rank(body: Callable[[], tuple[int, str | None]]) -> int:
    """Run `body` (→ exit code, error line or None) on this rank of a torchrun launch; return the exit code
    every rank agrees on, after at most one line on stderr from the whole run.

    Rank 0 prints as usual; other ranks' stdout and stderr are held back (progress and summaries are rank
    0's). The line said is that of the rank that failed first: a failure on one rank makes others fail
    after it (a peer gone mid-all-reduce), and theirs is not the cause. An error every rank meets alike (a
    bad input) is said once, as by one process; otherwise the line names its rank. When every rank posts
    its outcome, every rank exits with the first failure's code. A rank that fails while the others are
    still training cannot wait for them: after FAILED_RANK_WAIT it says why and exits with its own code,
    and torchrun stops the others (torchrun then prints its own summary and exits 1)."""
    _init_process_group()
    store = _status_store()
    r, w = rank(), world_size()
    held = io.StringIO()
    with contextlib.ExitStack() as stack:
        if r != 0:
            stack.enter_context(contextlib.redirect_stdout(held))
            stack.enter_context(contextlib.redirect_stderr(held))
        code, line = body()
    order, outcomes = _post_and_collect(store, code, line)
    if outcomes is None:
        agreed, says = code, order == 1
    else:
        failed = [o for o in outcomes if o["code"]]
        first = min(failed, key=lambda o: o["order"]) if failed else {"code": 0}
        alike = len(failed) == w and len({(o["code"], o["line"]) for o in failed}) == 1
        agreed, says = first["code"], (r == 0 if alike else order == 1)
    if says and code:
        # click prints its own usage errors (held back here on ranks other than 0): its last line says it
        said = line or (None if r == 0 else "".join(held.getvalue().strip().splitlines()[-1:]))
        if said:
            print(said if r == 0 else f"[rank {r} of {w}] {said}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            store.set("said", "1")
    elif outcomes is not None and agreed:  # torchrun stops every rank once one exits non-zero: let it be said first
        with contextlib.suppress(Exception):
            store.wait(["said"], FAILED_RANK_WAIT)
    if outcomes is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return agreed
