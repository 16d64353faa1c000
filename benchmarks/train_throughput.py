"""Training throughput: tokens/s and achieved GFLOP/s, next to a matmul peak measured in this process.

Usage: python benchmarks/train_throughput.py [--preset default] [--steps 20]

FLOPs per trained token = 6 x (weights of every Linear, unembedding included) + the attention score
and mixing products (12 x n_layers x mean sequence length x d_model). The peak is the best of a few
square matmuls (fp32 and bf16), so "share of peak" says how much the small model leaves on the table.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from mechedit.model.spec import PRESETS
from mechedit.model.train import build_model, encode_corpus
from mechedit.world import default_world_spec, generate_world
from mechedit.world.tokenizer import build_tokenizer


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def train_rate(preset: str, bf16: bool, steps: int, batch: int) -> tuple[float, float]:
    world = generate_world(default_world_spec())
    tok = build_tokenizer(world)
    model = build_model(PRESETS[preset], tok, 0)
    ids, mask = encode_corpus(tok, world.corpus())
    lengths = mask.sum(1)
    order = torch.argsort(lengths)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    tokens = flops = 0.0
    elapsed = 0.0
    for s in range(steps + 3):
        idx = order[torch.randint(0, len(order) - batch, (1,)).item():][:batch]
        width = int(lengths[idx].max())
        x, m = ids[idx, :width], mask[idx, :width]
        y = x.masked_fill(m == 0, -100)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t = time.perf_counter()
        with ctx:
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s >= 3:  # warm-up steps are not counted
            elapsed += time.perf_counter() - t
            n_tok = float(m.sum())
            tokens += n_tok
            flops += n_tok * (6 * linear + 12 * cfg.num_hidden_layers * width * cfg.hidden_size)
    return tokens / elapsed, flops / elapsed / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default", choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, batch {args.batch}")
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:8.1f} GFLOP/s   bf16 {peak16:8.1f} GFLOP/s   (bf16/fp32 {peak16 / peak32:.1f}x)")
    for bf16, peak in ((False, peak32), (True, peak16)):
        tps, gf = train_rate(args.preset, bf16, args.steps, args.batch)
        name = "bf16 autocast" if bf16 else "fp32"
        print(f"train {name:14s}: {tps:9.0f} tokens/s  {gf:7.1f} GFLOP/s  = {gf / peak:5.1%} of the {name.split()[0]} peak")


if __name__ == "__main__":
    main()
