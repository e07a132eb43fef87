"""An ONNX file run through ONNX Runtime, seen by modelzip as a model: one tensor in, one tensor out.

`OnnxModel` is an `nn.Module` without parameters whose forward runs an ONNX Runtime session, so `eval`,
`compare` and `export`'s verification measure it with the same code as a PyTorch model:

- in: the modelzip input convention (hf.py): float (N, …), token ids (N, L), or ids over mask (N, 2, L).
  A graph with two inputs (input_ids, attention_mask) gets them split (a mask of ones when the data has none);
- threads: one session per thread count, made when first asked for, with intra-op threads equal to
  `torch.get_num_threads()` at the call, so measure.latency_ms's thread setting holds for ONNX Runtime too;
- a graph exported with a fixed batch is run in slices of that batch (the last one padded).

onnx and onnxruntime are an optional extra (`pip install 'modelzip[onnx]'`), imported only when used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelzip_cli.errors import InputError, UsageError, first_line
from modelzip_cli.limits import check_memory, check_regular
from modelzip_cli.tokens import ids_and_mask

EXTRA_HINT = "pip install 'modelzip[onnx]'"
MAX_TRIPS = 1 << 24  # a Loop's constant trip count: far beyond any real graph's
RUN_LIMIT_S = 120.0  # one ONNX Runtime run (one batch): a graph that loops is stopped after this
META_CLASS_LOGITS = "modelzip.outputs_class_logits"  # "1"/"0": whether the output is class logits
_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def require_onnx(what: str = "ONNX export and ONNX models"):
    """(onnx, onnxruntime), or exit 2 naming the extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UsageError(f"{what} need the onnx and onnxruntime packages ({exc.name} is missing)",
                         hint=EXTRA_HINT) from None
    # fatal only: its warnings, and its errors (several lines, in colour, before the exception that carries
    # the same message), would break one-line output
    onnxruntime.set_default_logger_severity(4)
    return onnx, onnxruntime


def check_loops(graph, path: Path) -> None:
    """A `Loop` whose trip count is a constant above MAX_TRIPS (2^62 in a forged file) is refused before it runs;
    a loop bounded otherwise is stopped by the run's time limit (RUN_LIMIT_S)."""
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output:
                    constants[node.output[0]] = attr.t
    for node in graph.node:
        if node.op_type == "Loop" and node.input and node.input[0] in constants:
            trips = numpy_helper.to_array(constants[node.input[0]])
            if trips.size == 1 and int(trips.reshape(())) > MAX_TRIPS:
                raise InputError(f"{path}: Loop {node.name or node.output[0]!r} runs {int(trips.reshape(())):,} times, "
                                 f"more than the {MAX_TRIPS:,} modelzip runs", hint="check the graph")
        for attr in node.attribute:  # subgraphs (Loop bodies, If branches)
            if attr.type == attr.GRAPH:
                check_loops(attr.g, path)
            for g in attr.graphs:
                check_loops(g, path)


class OnnxModel(nn.Module):
    """An ONNX file as a modelzip model (module docstring)."""

    def __init__(self, path: Path, data: bytes | None = None):
        super().__init__()
        onnx, ort = require_onnx()
        self.path = Path(path)
        if data is None:
            check_regular(self.path, "ONNX file")  # a FIFO would hang the read
            check_memory(2 * self.path.stat().st_size, f"ONNX file {self.path}")  # the bytes, and the session's copy
            data = self.path.read_bytes()
        self._bytes = data
        try:
            proto = onnx.load_from_string(self._bytes)
        except Exception as exc:  # onnx raises its own types for every kind of bad file
            raise InputError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})",
                             hint="pass an .onnx file that ONNX Runtime runs") from None
        check_loops(proto.graph, self.path)
        try:
            session = self._session(1)
        except Exception as exc:  # onnxruntime raises its own types for every kind of bad graph
            raise InputError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})",
                             hint="pass an .onnx file that ONNX Runtime runs") from None
        self.inputs = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
        self.output_name = session.get_outputs()[0].name
        if len(self.inputs) not in (1, 2):
            raise InputError(f"{path}: the graph takes {len(self.inputs)} inputs; modelzip runs graphs of one "
                             "input, or of token ids and an attention mask")
        meta = {p.key: p.value for p in proto.metadata_props}
        out_rank = len(session.get_outputs()[0].shape)
        self.outputs_class_logits = meta.get(META_CLASS_LOGITS, "1" if out_rank == 2 else "0") == "1"
        batch = self.inputs[0][2][0] if self.inputs[0][2] else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        # parameters, for the report: the graph's stored tensors of more than one value (weights, biases)
        self._initializers = {t.name: tuple(t.dims) for t in proto.graph.initializer if np.prod(t.dims) > 1}
        self._sessions = {1: session}

    def _session(self, threads: int):
        _, ort = require_onnx()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # (see require_onnx)
        return ort.InferenceSession(self._bytes, options, providers=["CPUExecutionProvider"])

    def session(self):
        threads = max(1, torch.get_num_threads())
        if threads not in self._sessions:
            self._sessions[threads] = self._session(threads)
        return self._sessions[threads]

    def example_shape(self) -> tuple[list[int], str]:
        """A batch-1 example input shape and dtype from the graph's first input (symbolic sizes → 1, or 32
        tokens)."""
        name, kind, shape = self.inputs[0]
        tokens = kind == "tensor(int64)"
        dims = [d if isinstance(d, int) and d > 0 else (32 if tokens and i == len(shape) - 1 else 1)
                for i, d in enumerate(shape)]
        return [1, *dims[1:]], "long" if tokens else "float"

    def feeds(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        if len(self.inputs) == 2:  # (input_ids, attention_mask)
            ids, mask = ids_and_mask(x)
            return {self.inputs[0][0]: ids.long().numpy(), self.inputs[1][0]: mask.long().numpy()}
        name, kind, _ = self.inputs[0]
        return {name: x.detach().cpu().numpy().astype(_NUMPY.get(kind, np.float32), copy=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b = x.shape[0], self.fixed_batch
        if b is None or n == b:
            return self._run(x)
        pieces = []
        for i in range(0, n, b):  # a fixed-batch graph: slices of its batch, the last padded by repetition
            part = x[i:i + b]
            pad = b - part.shape[0]
            if pad:
                part = torch.cat([part, part[:1].expand(pad, *part.shape[1:])])
            pieces.append(self._run(part)[:b - pad])
        return torch.cat(pieces)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        import threading

        _, ort = require_onnx()
        options = ort.RunOptions()
        options.log_severity_level = 4  # (see require_onnx)
        timer = threading.Timer(RUN_LIMIT_S, lambda: setattr(options, "terminate", True))  # a graph that loops
        timer.daemon = True
        timer.start()
        try:
            out = self.session().run([self.output_name], self.feeds(x), options)[0]
        except Exception as exc:  # a shape the graph does not take, say, or the run was stopped
            if options.terminate:
                raise InputError(f"{self.path}: one run of the graph took more than {RUN_LIMIT_S:g} s, so it was "
                                 "stopped", hint="check the graph's loops") from None
            raise InputError(f"{self.path}: ONNX Runtime cannot run it on input of shape {list(x.shape)} "
                             f"({first_line(exc, 200)})", hint="pass data made for this model") from None
        finally:
            timer.cancel()
        if out.ndim == 0 or out.shape[0] != x.shape[0]:
            raise InputError(f"{self.path}: the graph answers {x.shape[0]} samples with an output of shape "
                             f"{list(out.shape)}; its output batch must follow its input's",
                             hint="export the graph with a dynamic (or matching) output batch")
        return torch.from_numpy(np.ascontiguousarray(out))

    def logical_weights(self) -> dict[str, torch.Tensor]:
        """Stand-ins of the graph's stored tensors (shapes only: measure.count_parameters counts them)."""
        return {name: torch.empty(shape, device="meta") for name, shape in self._initializers.items()}
