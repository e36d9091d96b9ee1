"""The local rule under FSDP2 (`fully_shard`): parameters are DTensors whose rows are split
across ranks, so each rank edits only its own rows, and a column's norm sums over ranks."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.utils import DistributedType
from transformers import get_constant_schedule

from hybridlm.config import ConfigError
from hybridlm.engine import Engine, check_local_learning, make_optimizer
from hybridlm.hub import full_state_dict, load_model
from hybridlm.plasticity import column_norms, writable_part
from tests.conftest import tiny_model
from tests.test_plasticity_ddp import GLOBAL_BATCH, _batches

# Two ranks at the same global batch as one process: the same arithmetic up to the order of
# float sums (gradient reduce-scatter, column norms summed across ranks); measured <= 2.1e-7.
TOL = 1e-6
# The attention key bias's exact gradient is zero (softmax ignores a shift shared by all keys):
# its gradient is rounding noise, which Adam scales up to steps of lr's size (measured 1.8e-5).
NOISE_ONLY, NOISE_TOL = "attention.self.key.bias", 1e-4
CASES = {  # name: (tiny_model options, the dictionary's FSDP2 placement: rows or columns)
    "hybrid": (dict(learning="hybrid", gate="surprise"), 0),
    "hebbian": (dict(learning="hebbian", gate="energy"), 0),
    # a trainable trunk layer sharded too; the dictionary split by column (FSDP2 needs even
    # chunks there: 14 neurons, 7 + 7)
    "hybrid_trunk_columns": (dict(learning="hybrid", gate="surprise", n_neurons=14,
                                  trainable_encoder_layers=1), 1),
}
FINAL = "hybrid_trunk_columns"  # the case whose final model folder is saved and reloaded


def _train(case: str, rank: int, world: int, accelerator, shard: bool, local: bool = True,
           save_to: Path | None = None) -> dict[str, torch.Tensor]:
    """The training engine over this rank's share of each global batch; with `shard`, the
    spiking head, the trainable trunk layers and the rest of the model are each sharded with
    `fully_shard` over all ranks. Returns the whole state dict (gathered); with `save_to`, the
    main process also writes the final model folder there, as `make train` does."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    options, dim = CASES[case]
    model = tiny_model(hebbian_lr=0.5, **options).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.2)
    for m in model.modules():  # the trunk layers' dropout would draw differently per rank
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if shard:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model._layers()[len(model._layers()) - model.n_top:]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.head, mesh=mesh, shard_placement_fn=lambda p: Shard(
            dim if p is model.head.dictionary else 0))
        fully_shard(model, mesh=mesh)
    opt = accelerator.prepare(make_optimizer(model, lr=1e-2, weight_decay=0.01))
    engine = Engine(accelerator, model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                    local=model.local_learning() if local else None)
    per_rank = GLOBAL_BATCH // world
    for ids in _batches():
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        out = model(input_ids=mine, labels=mine)
        assert engine.step(out.loss, out.local_statistic) is not None
    if save_to is not None:  # hybridlm.training.train_head's final save_pretrained
        state = full_state_dict(model)
        if accelerator.is_main_process:
            model.save_pretrained(save_to, state_dict=state)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _uneven_rows(world: int) -> list[tuple[int, int]]:
    """A 13 x 5 matrix split by rows (7 + 6 on two ranks): this rank's part is its rows, in
    place, and the column norms summed across ranks are the whole matrix's. Returns every
    rank's (first, end) row."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    whole = torch.arange(65.0).reshape(13, 5)
    w = distribute_tensor(whole, init_device_mesh("cpu", (world,)), [Shard(0)])
    part, (rows, cols), groups = writable_part(w)
    assert part.data_ptr() == w.to_local().data_ptr()  # the shard itself, not a copy
    assert torch.equal(part, whole[rows, cols]) and len(groups) == 1
    norms = column_norms(part, groups)
    assert torch.allclose(norms, whole.norm(dim=0), rtol=1e-6)
    spans = [None] * world
    dist.all_gather_object(spans, (rows.start, rows.stop))
    return spans


def _two_rank_worker():
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    results = {"uneven_rows": _uneven_rows(world)}
    out = Path(os.environ["HYBRIDLM_TEST_OUT"])
    for case in CASES:
        results[case] = _train(case, rank, world, acc, shard=True,
                               save_to=out.with_name(FINAL) if case == FINAL else None)
    if acc.is_main_process:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    # a fresh interpreter, as in test_plasticity_ddp (forking pytest's OpenMP pool can hang)
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.pt"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "tests.test_plasticity_fsdp"], cwd=root, check=True,
                   timeout=300, env=os.environ | {"HYBRIDLM_TEST_OUT": str(out)})
    return torch.load(out) | {"folder": out.with_name(FINAL)}


@pytest.mark.slow
def test_rows_split_unevenly_are_edited_in_place_with_whole_column_norms(two_ranks):
    assert two_ranks["uneven_rows"] == [(0, 7), (7, 13)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_sharded_ranks_match_one_process_and_keep_the_local_update(two_ranks, case):
    reference = _train(case, 0, 1, Accelerator(cpu=True), shard=False)
    gradient_only = _train(case, 0, 1, Accelerator(cpu=True), shard=False, local=False)
    sharded = two_ranks[case]
    assert sharded.keys() == reference.keys()
    for name in sorted(reference, key=lambda n: n != "head.dictionary"):  # the rule's first
        value = reference[name]
        atol = NOISE_TOL if name.endswith(NOISE_ONLY) else TOL
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=atol, msg=name)
    # the local rule moved the dictionary far beyond the tolerance: had a rank's edit been
    # lost (written to a copy, overwritten by the next step), the check above would fail
    key = "head.dictionary"
    assert (reference[key] - gradient_only[key]).abs().max() > 1000 * TOL
    assert (sharded[key] - gradient_only[key]).abs().max() > 1000 * TOL


@pytest.mark.slow
def test_the_final_folder_of_a_sharded_run_is_whole_and_loads_in_one_process(two_ranks):
    # a rank's slices saved as the weights would fail check_model_folder's shapes (or the
    # save itself): the folder must hold every tensor whole, as the ranks trained it
    model = load_model(two_ranks["folder"])
    trained = two_ranks[FINAL]
    assert model.state_dict().keys() == trained.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


# An FSDP1 accelerator cannot be built on a CPU-only machine: these fakes carry the two
# attributes the check reads, as Accelerate sets them (DeepSpeed's: test_plasticity_zero.py).
def _launch(kind: DistributedType, fsdp_version: int = 0) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp_version == 2,
                           unwrap_model=lambda model: model)


@pytest.mark.parametrize("launch, refused", [
    (_launch(DistributedType.NO), None),
    (_launch(DistributedType.MULTI_CPU), None),
    (_launch(DistributedType.MULTI_GPU), None),
    (_launch(DistributedType.FSDP, fsdp_version=2), None),
    (_launch(DistributedType.FSDP, fsdp_version=1), "FSDP version 1"),
    (_launch(DistributedType.MEGATRON_LM), "not been made exact"),
], ids=lambda v: getattr(v, "distributed_type", v))
def test_launches_that_would_lose_the_local_update_are_refused(launch, refused):
    check_refusal(launch, refused)


def check_refusal(launch, refused: str | None) -> None:
    """`check_local_learning` accepts `launch` (refused None), or refuses it with a message
    matching `refused` that offers bptt (also used by test_plasticity_zero.py)."""
    if refused is None:
        check_local_learning(launch)
        return
    with pytest.raises(ConfigError, match=refused) as e:
        check_local_learning(launch)
    assert "model.learning=bptt" in str(e.value)


if __name__ == "__main__":
    debug_launcher(_two_rank_worker, num_processes=2)
