"""A long-lived process that runs many CLI invocations in-process under an address-space limit.

Forking a fresh interpreter per case costs seconds (importing torch); one worker runs hundreds of
cases through `modelzip_cli.cli.app.run` and answers, per case, the exit code, what it printed on stderr
and which files under a watched folder changed. RLIMIT_AS turns an attempt to allocate what a forged
size field declares into an allocation error instead of a machine out of memory.

Protocol: one JSON object per line on stdin ({"argv": [...], "watch": DIR, "env": {...}}), one JSON
object per line back on the worker's own channel (its real stdout; the CLI's stdout and stderr are
captured per case).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 4 << 30  # 4 GiB of address space


def _snapshot(folder: str | None) -> dict[str, list[int]]:
    if not folder or not os.path.isdir(folder):
        return {}
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        with contextlib.suppress(OSError):
            st = p.lstat()
            out[str(p.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return out


def serve(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything written to fd 1 from C code must not corrupt the channel
    import torch

    from modelzip_cli.cli.app import run

    torch.set_num_threads(1)  # many tiny cases: a second thread only adds contention

    for line in sys.stdin:
        req = json.loads(line)
        saved = {k: os.environ.get(k) for k in req.get("env", {})}
        os.environ.update(req.get("env", {}))
        before = _snapshot(req.get("watch"))
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run(req["argv"])
        except BaseException as exc:  # run() must catch everything; say so if it did not
            code, err = "raised", io.StringIO(f"{type(exc).__name__}: {exc}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        after = _snapshot(req.get("watch"))
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        channel.write(json.dumps({"code": code, "stderr": err.getvalue()[-4000:], "changed": changed}) + "\n")


class Worker:
    """Client side: `Worker().call(argv, watch=folder)` → {"code", "stderr", "changed"}; restarts after a crash."""

    def __init__(self, limit: int = LIMIT, timeout: float = 60.0):
        self.limit, self.timeout, self.proc = limit, timeout, None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(self.limit)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=str(ROOT))

    def call(self, argv: list, *, watch: Path | None = None, env: dict | None = None) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = {"argv": [str(a) for a in argv], "watch": str(watch) if watch else None, "env": env or {}}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died("the worker was gone")
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            return self._died(f"no answer within {self.timeout:.0f} s" if not ready else "the worker died")
        return json.loads(line)

    def _died(self, why: str) -> dict:
        self.close()
        rc = self.proc.returncode if self.proc is not None else None
        return {"code": f"crashed ({why}, rc={rc})", "stderr": "", "changed": []}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
