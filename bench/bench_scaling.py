"""Scaling of the default training step with the number of processes (DDP, gloo, CPU), and the
parameters of the step-time model in docs/scaling.md ("Step time vs ranks").

    python bench/bench_scaling.py --out bench/results/bench_scaling.json [--repeats 3]

The step is the default config's spiking_pc head (N = 512, T = 8, hybrid learning, energy
gate) over trunk features with the SmolLM2 geometry (D = 576, the tied 49,152-word LM head),
as in bench/bench_heads.py: forward, backward, DDP's gradient all-reduce, AdamW and the local
rule's step (its statistic all-reduced). Each rank trains its own batch of 16 x 128 tokens (a
batch per process, as `make train` under `accelerate launch`): tokens/s = ranks x 2048 / step
time. The cores are split between the ranks (1 rank: all of them as torch threads; 2 ranks:
half each). Launches of 1 and 2 ranks alternate, `--repeats` times, each a fresh set of
processes reporting its median step; the result is the median over launches, and the 2-rank
/ 1-rank ratio is computed from this run's own medians.

Also measured, for the model: the step's FLOPs per token (torch's FlopCounterMode), the bytes
all-reduced per step (gradients of the trained tensors, counted from the parameters, plus the
local statistic and the finite-loss flag, counted as they pass), the frozen LM head's bytes
(what FSDP2 would gather if it sharded it), and the gloo all-reduce time of the step's bytes
and of 4 bytes (the latency) between the 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, LENGTH = 16, 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median time of one gloo all-reduce (sum) of `numel` float32 values across all ranks."""
    import torch
    import torch.distributed as dist

    buf = torch.ones(numel)
    times = []
    for i in range(repeats + 3):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_launch(steps: int) -> dict | None:
    """This rank's part of a launch (the world comes from the environment): the step's
    median time, and on rank 0 of a multi-rank launch the communication it did."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_heads import build, features

    feats, source = features(BATCH, LENGTH)
    ids = torch.randint(1000, 40000, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    engine = build("spiking_pc", "hybrid", feats)  # gloo when WORLD_SIZE > 1
    acc = engine.accelerator
    reduced: list[int] = []  # bytes of each all-reduce the engine makes besides DDP's
    mean, finite = engine.mean_over_processes, engine.all_finite

    def counted_mean(t):
        reduced.append(t.numel() * t.element_size())
        return mean(t)

    def counted_finite(loss):
        reduced.append(4)  # one float32 flag
        return finite(loss)

    engine.mean_over_processes, engine.all_finite = counted_mean, counted_finite

    def step() -> None:
        out = engine.model(input_ids=ids, labels=ids, features=feats)
        engine.step(out.loss, out.local_statistic)

    with FlopCounterMode(display=False) as flops:  # the first step: forward and backward
        step()
    step()  # warm-up
    reduced_per_step = sum(reduced[len(reduced) // 2:])  # the second step's
    acc.wait_for_everyone()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    params = [p for p in engine.base.parameters() if p.requires_grad]
    gradient_bytes = sum(p.numel() * p.element_size() for p in params)
    trunk = engine.base.config.encoder_config  # the frozen (tied) LM head the step reads
    lm_head_bytes = trunk.vocab_size * trunk.hidden_size * 4
    result = {"ranks": acc.num_processes, "threads": torch.get_num_threads(),
              "median_step_seconds": statistics.median(times), "step_seconds": times,
              "features": source, "flops_per_step": flops.get_total_flops(),
              "gradient_bytes": gradient_bytes, "other_allreduce_bytes": reduced_per_step,
              "frozen_lm_head_bytes": lm_head_bytes}
    if acc.num_processes > 1:
        total = gradient_bytes + reduced_per_step
        result |= {"allreduce_seconds_step_bytes": allreduce_seconds(total // 4),
                   "allreduce_seconds_4_bytes": allreduce_seconds(1)}
    return result if acc.is_main_process else None


def launch(ranks: int, steps: int) -> dict:
    """`ranks` fresh processes (gloo over loopback), the cores split between them; rank 0's
    report."""
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    if ranks > 1:  # one rank is a plain process, as `make train` runs it (no DDP wrapper)
        env |= {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo",
                "ACCELERATE_USE_CPU": "yes", "ACCELERATE_MIXED_PRECISION": "no"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--steps", str(steps)],
                              env=env | ({"RANK": str(r), "LOCAL_RANK": str(r)}
                                         if ranks > 1 else {}),
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a {ranks}-rank launch failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/bench_scaling.json")
    p.add_argument("--steps", type=int, default=6, help="timed steps per launch")
    p.add_argument("--repeats", type=int, default=3, help="launches of each world size")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = one_launch(args.steps)
        if result is not None:
            print(json.dumps(result))
        return
    from tqdm.auto import tqdm

    worlds = (1, 2)
    launches: dict[int, list[dict]] = {w: [] for w in worlds}
    with tqdm(total=args.repeats * len(worlds), desc="launches") as bar:
        for _ in range(args.repeats):  # alternated, so machine noise hits both alike
            for w in worlds:
                launches[w].append(launch(w, args.steps))
                bar.update()
    step = {w: statistics.median(r["median_step_seconds"] for r in launches[w]) for w in worlds}
    tokens = {w: w * BATCH * LENGTH / step[w] for w in worlds}
    two = launches[2]
    result = {
        "step": "spiking_pc, hybrid learning, energy gate, N=512, T=8, D=576, vocab 49,152",
        "tokens_per_rank_per_step": BATCH * LENGTH, "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "steps_per_launch": args.steps,
        "threads_per_rank": {w: launches[w][0]["threads"] for w in worlds},
        "features": launches[1][0]["features"],
        "median_step_seconds": step, "tokens_per_second": tokens,
        "ratio_2_to_1": tokens[2] / tokens[1],
        # the model's parameters (docs/scaling.md, bench/scaling_model.py)
        "compute_seconds_per_token_1_rank": step[1] / (BATCH * LENGTH),
        "flops_per_token": launches[1][0]["flops_per_step"] / (BATCH * LENGTH),
        "gradient_bytes_per_step": launches[1][0]["gradient_bytes"],
        "other_allreduce_bytes_per_step": two[0]["other_allreduce_bytes"],
        "frozen_lm_head_bytes": launches[1][0]["frozen_lm_head_bytes"],
        "allreduce_seconds_step_bytes_2_ranks":
            statistics.median(r["allreduce_seconds_step_bytes"] for r in two),
        "allreduce_seconds_4_bytes_2_ranks":
            statistics.median(r["allreduce_seconds_4_bytes"] for r in two),
        "per_launch": launches,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['cpu_count']} cores; threads per rank {result['threads_per_rank']}")
    print("| ranks | median step (s) | tokens/s |\n|---|---|---|")
    for w in worlds:
        print(f"| {w} | {step[w]:.3f} | {tokens[w]:,.0f} |")
    total = result["gradient_bytes_per_step"] + result["other_allreduce_bytes_per_step"]
    print(f"2 ranks / 1 rank tokens/s: {result['ratio_2_to_1']:.2f}; all-reduced per step "
          f"{total:,} bytes in {result['allreduce_seconds_step_bytes_2_ranks'] * 1e3:.1f} ms "
          f"(gloo, 2 ranks); wrote {args.out}")


if __name__ == "__main__":
    main()
