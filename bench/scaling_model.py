"""Step time vs ranks, predicted from the parameters bench/bench_scaling.py measured: the table
of docs/scaling.md ("Step time vs ranks").

    python bench/scaling_model.py [--measured bench/results/bench_scaling.json]
                                  [--flops 50e12] [--latency-us 5]

Per rank and step (each rank trains its own batch of b tokens, as DDP runs `make train`):

    compute  = b * flops_per_token / F              (F: the GPU's sustained FLOP/s, assumed)
    DDP      = sum over its all-reduces (gradients; local statistic + gate inputs; the
               finite-loss flag) of  2 (n-1)/n * bytes / bw + 2 (n-1) * alpha   (ring)
    FSDP2    = 2 all-gathers of the parameters the step reads (forward, and again in
               backward: reshard_after_forward) + 1 reduce-scatter of the gradients, each
               (n-1)/n * bytes / bw + (n-1) * alpha, plus the local statistic's all-reduce
    step     = compute + communication (no overlap: an upper bound on the step time)
    efficiency = compute / step;  tokens/s = n * b / step

bw is the per-GPU link bandwidth (bus bandwidth in NCCL's terms), alpha the latency of one
ring hop; for DDP at the largest size the tree's latency (2 log2 n hops) is printed too.
FSDP2 is shown twice: with the frozen tied LM head sharded too (what `fully_shard` of the
whole model does) and with only the trained head sharded (the LM head replicated).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GPUS = (8, 64, 512)
BANDWIDTHS_GBPS = (25, 100, 400)


def ring_allreduce(n: int, nbytes: float, bw: float, alpha: float, tree: bool = False
                   ) -> float:
    """Ring all-reduce of `nbytes`; `tree`: the latency of a binary tree instead
    (2 log2(n) hops), which NCCL picks for small messages at many ranks."""
    hops = 2 * math.ceil(math.log2(n)) if tree else 2 * (n - 1)
    return 2 * (n - 1) / n * nbytes / bw + hops * alpha


def ring_gather_or_scatter(n: int, nbytes: float, bw: float, alpha: float) -> float:
    """An all-gather or a reduce-scatter of a tensor of `nbytes` in all."""
    return (n - 1) / n * nbytes / bw + (n - 1) * alpha


def predict(m: dict, n: int, bw: float, flops: float, alpha: float, tree: bool = False
            ) -> dict:
    """Seconds per step for DDP and the two FSDP2 layouts at `n` ranks, `bw` bytes/s."""
    b = m["tokens_per_rank_per_step"]
    compute = b * m["flops_per_token"] / flops
    grads, other = m["gradient_bytes_per_step"], m["other_allreduce_bytes_per_step"]
    stat = other - 4  # the finite-loss flag is 4 bytes
    ddp = sum(ring_allreduce(n, x, bw, alpha, tree) for x in (grads, stat, 4))
    out = {"compute": compute, "ddp": ddp}
    for name, gathered in (("fsdp2_all", grads + m["frozen_lm_head_bytes"]),
                           ("fsdp2_head", grads)):
        out[name] = (2 * ring_gather_or_scatter(n, gathered, bw, alpha)
                     + ring_gather_or_scatter(n, grads, bw, alpha)
                     + ring_allreduce(n, stat, bw, alpha) + ring_allreduce(n, 4, bw, alpha))
    return out


def table(m: dict, flops: float, alpha: float) -> str:
    b = m["tokens_per_rank_per_step"]
    rows = ["| GPUs | link GB/s | DDP comm ms | DDP eff. | DDP Mtok/s | FSDP2 (LM head "
            "sharded) comm ms | eff. | FSDP2 (head only) comm ms | eff. |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n in GPUS:
        for gbps in BANDWIDTHS_GBPS:
            p = predict(m, n, gbps * 1e9, flops, alpha)
            c = p["compute"]

            def eff(comm: float, c: float = c) -> str:
                return f"{c / (c + comm):.0%}"

            rows.append(
                f"| {n} | {gbps} | {p['ddp'] * 1e3:.2f} | {eff(p['ddp'])} | "
                f"{n * b / (c + p['ddp']) / 1e6:.1f} | {p['fsdp2_all'] * 1e3:.2f} | "
                f"{eff(p['fsdp2_all'])} | {p['fsdp2_head'] * 1e3:.2f} | {eff(p['fsdp2_head'])} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--measured", default="bench/results/bench_scaling.json")
    p.add_argument("--flops", type=float, default=50e12,
                   help="sustained FLOP/s of one GPU on this step (assumed, not measured)")
    p.add_argument("--latency-us", type=float, default=5.0, help="alpha, per ring hop")
    args = p.parse_args()
    path = Path(args.measured)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run bench/bench_scaling.py first")
    m = json.loads(path.read_text())
    alpha = args.latency_us * 1e-6
    compute = m["tokens_per_rank_per_step"] * m["flops_per_token"] / args.flops
    print(f"measured: {m['flops_per_token'] / 1e6:.1f} MFLOP/token, "
          f"{m['tokens_per_rank_per_step']} tokens per rank and step, all-reduced per step "
          f"{m['gradient_bytes_per_step']:,} B of gradients + "
          f"{m['other_allreduce_bytes_per_step']:,} B of local statistic and flags; frozen LM "
          f"head {m['frozen_lm_head_bytes']:,} B")
    print(f"assumed: F = {args.flops / 1e12:g} TFLOP/s per GPU (compute {compute * 1e3:.2f} ms "
          f"per step), alpha = {args.latency_us:g} us per ring hop, no overlap\n")
    print(table(m, args.flops, alpha))
    for gbps in BANDWIDTHS_GBPS:  # the latency term dominates at 512: the tree's instead
        p = predict(m, GPUS[-1], gbps * 1e9, args.flops, alpha, tree=True)
        print(f"\n{GPUS[-1]} GPUs, {gbps} GB/s, tree latency: DDP comm {p['ddp'] * 1e3:.2f} ms, "
              f"efficiency {p['compute'] / (p['compute'] + p['ddp']):.0%}", end="")
    print()


if __name__ == "__main__":
    main()
