"""Low-rank: randomized against exact SVD on a 4096×4096 matrix with a decaying spectrum, and the
factorized MLP 1024→4096→4096→1024 at --rank-ratio 0.125 against the original, in one run."""

from __future__ import annotations

import statistics
import time

MLP = {"input_size": 1024, "hidden_sizes": [4096, 4096], "num_classes": 1024, "dropout": 0.0}
ROUNDS = 3


def run() -> dict:
    import torch

    from modelzip_cli.checkpoint.io import build_arch
    from modelzip_cli.measure.metrics import default_threads, latency_ms
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.techniques.lowrank import LowRankConfig, lowrank

    threads = default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, rank = 4096, 256
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    s = torch.exp(-torch.arange(n, dtype=torch.float32) / 200)  # decaying, as trained weights' spectra do
    w = (u * s) @ v.T
    norm = torch.linalg.norm(w)

    def exact():
        uu, ss, vh = torch.linalg.svd(w, full_matrices=False)
        return uu[:, :rank] * ss[:rank] @ vh[:rank]

    def randomized():
        torch.manual_seed(0)
        cfg = LowRankConfig(rank_ratio=1.0)
        uu, ss, vv = torch.svd_lowrank(w, q=rank + cfg.oversample, niter=cfg.niter)
        return uu[:, :rank] * ss[:rank] @ vv[:, :rank].T

    times = {"exact": [], "randomized": []}
    errors = {}
    for _ in range(ROUNDS):
        for name, fn in (("exact", exact), ("randomized", randomized)):
            t0 = time.perf_counter()
            approx = fn()
            times[name].append(time.perf_counter() - t0)
            errors[name] = float(torch.linalg.norm(w - approx) / norm)
    optimal = float(torch.sqrt((s[rank:] ** 2).sum()) / torch.sqrt((s ** 2).sum()))

    model = build_arch("zoo:mlp", MLP).eval()
    dense = build_arch("zoo:mlp", MLP).eval()
    dense.load_state_dict(model.state_dict())
    step = lowrank(model, LowRankConfig(rank_ratio=0.125, include=["layers.*"]),
                   Context(example_input=torch.randn(1, 1024)))
    factored = step.model
    x = torch.randn(64, 1024)
    lat = [(latency_ms(dense, x, threads=threads), latency_ms(factored, x, threads=threads)) for _ in range(5)]
    d, f = statistics.median(r[0] for r in lat), statistics.median(r[1] for r in lat)
    return {
        "svd": {"shape": [n, n], "rank": rank, "exact_s": statistics.median(times["exact"]),
                "randomized_s": statistics.median(times["randomized"]),
                "speedup": statistics.median(times["exact"]) / statistics.median(times["randomized"]),
                "exact_rel_error": errors["exact"], "randomized_rel_error": errors["randomized"],
                "error_ratio": errors["randomized"] / errors["exact"], "optimal_rel_error": optimal},
        "mlp_rank_ratio_0.125_batch_64": {"dense_ms": d, "factored_ms": f, "speedup": d / f, "threads": threads,
                                          "ranks": {r["name"]: r["rank"] for r in step.layers},
                                          "dense_params": sum(p.numel() for p in dense.parameters()),
                                          "factored_params": sum(p.numel() for p in factored.parameters())},
    }


def summary(r: dict) -> str:
    s, m = r["svd"], r["mlp_rank_ratio_0.125_batch_64"]
    return "\n".join([
        f"SVD of a {s['shape'][0]}×{s['shape'][1]} matrix (spectrum e^(-i/200)) at rank {s['rank']}:", "",
        "| path | median s | relative error |", "|---|---|---|",
        f"| exact `torch.linalg.svd` | {s['exact_s']:.2f} | {s['exact_rel_error']:.5f} |",
        f"| randomized `torch.svd_lowrank` | {s['randomized_s']:.2f} | {s['randomized_rel_error']:.5f} |", "",
        f"Randomized is **{s['speedup']:.1f}×** faster; its error is {100 * (s['error_ratio'] - 1):+.2f}% of the "
        f"exact truncation's (the optimum is {s['optimal_rel_error']:.5f}).", "",
        f"MLP 1024→4096→4096→1024 at --rank-ratio 0.125, batch 64, {m['threads']} threads: "
        f"{m['dense_ms']:.3f} ms → {m['factored_ms']:.3f} ms, **{m['speedup']:.2f}×** "
        f"({m['dense_params']:,} → {m['factored_params']:,} parameters).",
    ])
