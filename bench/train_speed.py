"""Training throughput of the example target (steps/s, tokens/s) for the expert forwards
and batch sizes given, on random tokens; optional torch-profiler table of one variant.

    python3 bench/train_speed.py --variants grouped:32 mixed:32 mixed:64 --json out/train_speed.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tilecomp.train import configs, loop
from tilecomp.train import target as tg


def measure(moe: str, batch: int, steps: int, size: str, seq_len: int, device, profile: str | None):
    cfg, _ = configs.CONFIGS[size](4096)
    s = tg.TargetSettings(batch=batch, seq_len=seq_len, moe=moe)
    model = tg.build_trainable(cfg, 0, moe).to(device)
    opt = tg.make_optimizer(model, s)
    load = tg.RouterLoad(model)
    ids = torch.randint(2, 4096, (batch, seq_len + 1), device=device)
    for _ in range(3):
        tg.train_step(model, opt, load, ids, device, s)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = tg.train_step(model, opt, load, ids, device, s)
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    row = {"moe": moe, "batch": batch, "seq_len": seq_len, "ms_per_step": 1e3 * dt,
           "steps_per_s": 1 / dt, "tokens_per_s": batch * seq_len / dt, "loss": float(loss),
           "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(2):
                tg.train_step(model, opt, load, ids, device, s)
            torch.cuda.synchronize(device)
        with open(profile, "a") as f:
            f.write(f"== {moe} batch {batch}\n")
            f.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=30) + "\n")
    del model, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="+", default=["grouped:32", "mixed:32", "mixed:64"],
                    help="MOE:BATCH pairs (moe: grouped | mixed)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", default="example")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--profile", default=None, help="append a profiler table of each variant here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = loop.pick_device(None)
    if device.type != "cuda":
        raise SystemExit("train_speed.py measures GPU training; no CUDA device found")
    rows = []
    for v in args.variants:
        moe, batch = v.split(":")
        steps = args.steps if moe == "mixed" else max(3, args.steps // 4)
        rows.append(measure(moe, int(batch), steps, args.size, args.seq_len, device, args.profile))
        print(json.dumps(rows[-1]), flush=True)
    result = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "size": args.size,
              "variants": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
