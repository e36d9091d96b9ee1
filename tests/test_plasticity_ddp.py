"""Local updates under several processes: DDP does not synchronise them, the engine does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from transformers import get_constant_schedule

from hybridlm.engine import Engine, make_optimizer
from tests.conftest import tiny_model

STEPS, GLOBAL_BATCH = 5, 4


def _batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(5, 120, (GLOBAL_BATCH, 12), generator=g) for _ in range(STEPS)]


def _train(rank: int, world: int, accelerator):
    """STEPS steps of the training engine, this rank's share of each global batch."""
    model = tiny_model(learning="hybrid", gate="surprise", hebbian_lr=0.5).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.2)
    model, opt = accelerator.prepare(model, make_optimizer(model, lr=1e-2, weight_decay=0.01))
    base = accelerator.unwrap_model(model)
    engine = Engine(accelerator, model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                    local=base.local_learning())
    per_rank = GLOBAL_BATCH // world
    for ids in _batches():
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        out = model(input_ids=mine, labels=mine)
        assert engine.step(out.loss, out.local_statistic) is not None
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return state, engine.local.gate.expected


def _two_rank_worker():
    acc = Accelerator(cpu=True)
    state, expected = _train(acc.process_index, acc.num_processes, acc)
    flat = torch.cat([v.flatten().double() for v in state.values()])
    everyone = acc.gather(flat.unsqueeze(0))  # (ranks, n)
    if acc.is_main_process:
        out = {
            "world": acc.num_processes,
            "ranks_identical": bool((everyone == everyone[0]).all()),
            "gate_expected": expected,
            "params": everyone[0].tolist(),
        }
        with open(os.environ["HYBRIDLM_TEST_OUT"], "w") as f:
            json.dump(out, f)


@pytest.mark.slow
def test_two_ranks_stay_bit_identical_and_match_one_process(tmp_path):
    # debug_launcher forks; forking a process whose OpenMP pool already ran (as pytest's has,
    # after other tests) can deadlock, so the two ranks start from a fresh interpreter.
    out = tmp_path / "ddp.json"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "tests.test_plasticity_ddp"], cwd=root, check=True,
                   timeout=300, env=os.environ | {"HYBRIDLM_TEST_OUT": str(out)})
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["ranks_identical"]
    single, expected = _train(0, 1, Accelerator(cpu=True))
    flat = torch.cat([v.flatten().double() for v in single.values()])
    two = torch.tensor(result["params"], dtype=torch.float64)
    # Same global batch: equal up to float rounding (gradient all-reduce order, Adam).
    torch.testing.assert_close(two, flat, rtol=1e-4, atol=1e-5)
    assert result["gate_expected"] == pytest.approx(expected, rel=1e-5)


if __name__ == "__main__":
    debug_launcher(_two_rank_worker, num_processes=2)
