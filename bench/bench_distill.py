"""Distillation throughput: modelzip's loop (teacher logits cached once) against the seed's loop (a
teacher forward in every batch), same data, student, epochs, seed and loss, in one run."""

from __future__ import annotations

import statistics
import time

from bench.common import ROOT

EPOCHS = 20
ROUNDS = 3


def seed_loop(teacher, student, data, epochs: int, lr: float, temperature: float, alpha: float, seed: int):
    """The seed's way: the teacher runs on every batch of every epoch."""
    import math

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * math.ceil(len(data) / 64))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    teacher.eval()
    for _ in range(epochs):
        student.train()
        for x, y, _ in data.batches(64, shuffle=True, generator=gen):
            with torch.no_grad():
                t_logits = teacher(x)
            logits = student(x)
            soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                            log_target=True, reduction="batchmean") * temperature ** 2
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return student.eval()


CASES = {
    "digits": ("digits_teacher", "digits", "zoo:mlp", {"hidden_sizes": [64, 32]}),
    "mnist1d": ("mnist1d_teacher", "mnist1d", "zoo:cnn1d", {"channels": [8, 8, 8]}),
}


def run_case(teacher_name: str, data_name: str, arch: str, kwargs: dict, threads: int) -> dict:
    import torch

    from modelzip_cli.checkpoint.io import build_arch, load_checkpoint
    from modelzip_cli.pipeline.context import Context
    from modelzip_cli.pipeline.data import load_data
    from modelzip_cli.pipeline.run import evaluate
    from modelzip_cli.techniques.distill import DistillConfig, apply

    teacher = load_checkpoint(ROOT / "sample_models" / f"{teacher_name}.safetensors")
    train = load_data(ROOT / "sample_models" / f"{data_name}_train.safetensors")
    test = load_data(ROOT / "sample_models" / f"{data_name}_test.safetensors")
    cfg = DistillConfig(student=arch, student_kwargs=kwargs, epochs=EPOCHS)
    ours_s, seed_s, ours_acc, seed_acc = [], [], [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        student = apply(teacher.model, cfg, Context(seed=0, data=train), teacher.manifest).model
        ours_s.append(time.perf_counter() - t0)
        ours_acc.append(evaluate(student, test)["accuracy"])
        torch.manual_seed(0)
        fresh = build_arch(arch, kwargs)
        t0 = time.perf_counter()
        student = seed_loop(teacher.model, fresh, train, EPOCHS, cfg.lr, cfg.temperature, cfg.alpha, 0)
        seed_s.append(time.perf_counter() - t0)
        seed_acc.append(evaluate(student, test)["accuracy"])
    samples = EPOCHS * len(train)
    ours, seed = statistics.median(ours_s), statistics.median(seed_s)
    return {"student": f"{arch} {kwargs}", "train_samples": len(train), "modelzip_s": ours, "seed_s": seed,
            "modelzip_samples_per_s": samples / ours, "seed_samples_per_s": samples / seed, "speedup": seed / ours,
            "modelzip_accuracy": statistics.median(ours_acc), "seed_accuracy": statistics.median(seed_acc)}


def run() -> dict:
    import torch

    from modelzip_cli.measure.metrics import default_threads

    threads = default_threads()
    torch.set_num_threads(threads)
    return {"epochs": EPOCHS, "threads": threads, "rounds": ROUNDS,
            "cases": {name: run_case(*case, threads) for name, case in CASES.items()}}


def summary(r: dict) -> str:
    lines = [f"{r['epochs']} epochs, {r['threads']} threads, median of {r['rounds']} rounds; the modelzip time "
             "includes computing the cached teacher logits. modelzip's loop differs from the seed's in two ways, "
             "both measured here: the teacher's soft targets are computed once, and AdamW is the fused kernel.",
             "",
             "| teacher → student | loop | s | samples/s | test accuracy |", "|---|---|---|---|---|"]
    for name, c in r["cases"].items():
        lines += [f"| {name}: {c['student']} | modelzip (cached) | {c['modelzip_s']:.2f} | "
                  f"{c['modelzip_samples_per_s']:,.0f} | {c['modelzip_accuracy']:.4f} |",
                  f"| | seed (teacher every batch) | {c['seed_s']:.2f} | {c['seed_samples_per_s']:,.0f} | "
                  f"{c['seed_accuracy']:.4f} |"]
    lines.append("")
    lines += [f"- {name}: speed-up **{c['speedup']:.2f}×**, accuracy difference "
              f"{100 * (c['modelzip_accuracy'] - c['seed_accuracy']):+.2f} points" for name, c in r["cases"].items()]
    return "\n".join(lines)
