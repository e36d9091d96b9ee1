"""The local rule under DeepSpeed (ZeRO stages 0 to 3): ZeRO's optimizer keeps its own fp32
copy of every parameter and overwrites a plain in-place edit at its next step, so the rule
writes there too (`hybridlm.plasticity.zero_write`); launches it cannot keep exact are
refused. The final model folder of a ZeRO-3 run holds whole weights.

Accelerate's DeepSpeed plugin needs a GPU (on a CPU-only machine it silently runs DDP), so the
two-rank test builds the ZeRO engine with `deepspeed.initialize` and drives it as Accelerate's
DeepSpeed integration does (`ZeroLaunch`). It skips when deepspeed is not installed (it is
the optional extra `deepspeed`)."""

import functools
import importlib.util
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

from hybridlm import plasticity, precision, training
from hybridlm.config import ConfigError
from hybridlm.engine import Engine, make_optimizer
from hybridlm.hub.folder import check_model_folder, load_model
from tests.conftest import command, tiny_model
from tests.test_plasticity_ddp import GLOBAL_BATCH, _batches
from tests.test_plasticity_fsdp import CASES, NOISE_ONLY, NOISE_TOL, check_refusal
from tests.test_plasticity_fsdp import _train as _one_process

STAGES = (0, 1, 2, 3)  # 0: DeepSpeed without ZeRO (its optimizer steps the parameters)
# the dictionary without gradient (hebbian) and with it, beside a trainable trunk layer
ZERO_CASES = ("hebbian", "hybrid_trunk_columns")
# Two ranks at the same global batch as one process: the same arithmetic up to the order of
# float sums (gradient reduction over ranks, flat partitions); measured max difference below.
TOL = 1e-6
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
SAVED = ("hybrid_trunk_columns", 3)  # the run whose final model folder is saved and loaded


class ZeroLaunch:
    """What Accelerate does around a DeepSpeed engine (accelerate.utils.deepspeed), for the
    training `Engine`: `backward` runs DeepSpeed's backward and, at a step boundary, its step
    (clipping with the config's `gradient_clipping`, optimizer, zero grad); the prepared
    optimizer's own `step` is a no-op. `accelerator`: a CPU Accelerator for the collectives."""

    distributed_type = DistributedType.DEEPSPEED
    is_fsdp2 = False
    sync_gradients = True  # no gradient accumulation here: every micro-batch steps
    mixed_precision = "no"

    def __init__(self, accelerator, ds_engine, config: dict):
        from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

        self.accelerator, self.wrapped = accelerator, DeepSpeedEngineWrapper(ds_engine)
        self.num_processes = accelerator.num_processes
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))

    def reduce(self, t, reduction):
        return self.accelerator.reduce(t, reduction)

    def unwrap_model(self, model):
        return model.module

    def backward(self, loss):
        self.wrapped.backward(loss, sync_gradients=self.sync_gradients)

    def clip_grad_norm_(self, parameters, max_norm):
        return self.wrapped.get_global_grad_norm()

    @property
    def deepspeed_config(self) -> dict:
        return self.state.deepspeed_plugin.deepspeed_config

    def get_state_dict(self, model, unwrap: bool = True):
        return Accelerator.get_state_dict(self, model, unwrap)  # Accelerate's own code


@functools.cache
def _reference(case: str, local: bool = True) -> dict[str, torch.Tensor]:
    """One process at the same global batch (computed once per case: the tests only read it)."""
    return _one_process(case, 0, 1, Accelerator(cpu=True), shard=False, local=local)


def _zero_config(stage: int, per_rank: int, offload: bool = False) -> dict:
    # ZeRO-3 would keep parameters under 1e5 elements whole on every rank (all of the tiny
    # model's): a threshold of 0 partitions every one, as in a real model
    zero = {"stage": stage} | ({"stage3_param_persistence_threshold": 0,
                                "stage3_gather_16bit_weights_on_model_save": True}
                               if stage == 3 else {})
    config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if offload:  # the master copy (and under ZeRO-3 the parameters) in host memory
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW: DeepSpeed's is compiled
    return config


def _zero_train(case: str, stage: int, rank: int, world: int, accelerator,
                save_to: str | None = None, offload: bool = False) -> dict[str, torch.Tensor]:
    """test_plasticity_fsdp's run of `case` (the same model, data and steps) with the model
    and optimizer under ZeRO `stage`. Returns the whole state dict (gathered) and, under
    `master.`, the optimizer's fp32 copy of the dictionary when it has one. `save_to`: a
    folder where the main process saves the model as make train does at the end; `offload`:
    the optimizer state (and under ZeRO-3 the parameters) offloaded to host memory."""
    import deepspeed
    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper
    from deepspeed.utils import safe_get_full_fp32_param

    model = tiny_model(hebbian_lr=0.5, **CASES[case][0]).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.2)
    for m in model.modules():  # the trunk layers' dropout would draw differently per rank
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    per_rank = GLOBAL_BATCH // world
    config = _zero_config(stage, per_rank, offload)
    ds_model, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model, lr=1e-2, weight_decay=0.01),
        config=config, dist_init_required=False)
    launch = ZeroLaunch(accelerator, ds_model, config)
    opt = DeepSpeedOptimizerWrapper(ds_opt)
    engine = Engine(launch, ds_model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                    local=model.local_learning())
    for ids in _batches():
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        out = ds_model(input_ids=mine, labels=mine)
        assert engine.step(out.loss, out.local_statistic) is not None
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    master = safe_get_full_fp32_param(model.head.dictionary)
    if save_to is not None:
        whole = training.whole_state_dict(launch, ds_model)  # every rank
        if rank == 0:
            model.save_pretrained(save_to, state_dict=whole)
    if master is not None:
        state["master.head.dictionary"] = master.reshape(state["head.dictionary"].shape)
    return state


def _two_rank_worker():
    import deepspeed

    # DeepSpeed's shared-memory all-reduce for CPU ranks is compiled on first use (minutes);
    # without it every collective goes through gloo, as the Accelerator's do
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    results = {}
    for stage in STAGES:
        for case in ZERO_CASES:
            save_to = os.environ["HYBRIDLM_TEST_FOLDER"] if (case, stage) == SAVED else None
            results[case, stage] = _zero_train(case, stage, rank, world, acc, save_to)
    for stage in (2, 3):
        results["cpu offload", stage] = _zero_train("hybrid_trunk_columns", stage, rank, world,
                                                    acc, offload=True)
    # The same run with the plain in-place write (ZeRO stage 2): its update is lost
    real = plasticity.is_zero_parameter
    plasticity.is_zero_parameter = lambda weight: False
    try:
        results["plain write", 2] = _zero_train("hybrid_trunk_columns", 2, rank, world, acc)
    finally:
        plasticity.is_zero_parameter = real
    if acc.is_main_process:
        torch.save(results, os.environ["HYBRIDLM_TEST_OUT"])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    # a fresh interpreter, as in test_plasticity_ddp (forking pytest's OpenMP pool can hang)
    out = tmp_path_factory.mktemp("zero")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "tests.test_plasticity_zero"], cwd=root, check=True,
                   timeout=300, env=os.environ | {"HYBRIDLM_TEST_OUT": str(out / "zero.pt"),
                                                  "HYBRIDLM_TEST_FOLDER": str(out / "model"),
                                                  "DS_BUILD_OPS": "0"})
    return torch.load(out / "zero.pt") | {"folder": out / "model"}


needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (the optional extra: "
    "pip install -c constraints.txt '.[deepspeed]' with DS_BUILD_OPS=0)")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("run", [(case, stage) for stage in STAGES for case in ZERO_CASES]
                         + [("cpu offload", 2), ("cpu offload", 3)], ids=str)
def test_two_zero_ranks_match_one_process_and_keep_the_local_update(two_ranks, run):
    case, stage = run
    reference = _reference("hybrid_trunk_columns" if case == "cpu offload" else case)
    zero = dict(two_ranks[run])
    master = zero.pop("master.head.dictionary", None)
    assert zero.keys() == reference.keys()
    for name in sorted(reference, key=lambda n: n != "head.dictionary"):  # the rule's first
        atol = NOISE_TOL if name.endswith(NOISE_ONLY) else TOL
        torch.testing.assert_close(zero[name], reference[name], rtol=0, atol=atol, msg=name)
    if case != "hebbian" and stage > 0:  # ZeRO's master copy holds the update too
        torch.testing.assert_close(master, zero["head.dictionary"], rtol=0, atol=0)


@pytest.mark.slow
@needs_deepspeed
def test_a_plain_in_place_write_is_lost_under_zero(two_ranks):
    """What the ZeRO write prevents: written into the parameter alone, the update is undone
    by the optimizer's next step (from its own fp32 copy); the reference moves far from it."""
    case = "hybrid_trunk_columns"
    reference, gradient_only = _reference(case), _reference(case, local=False)
    key = "head.dictionary"
    lost = two_ranks["plain write", 2][key]
    assert (reference[key] - gradient_only[key]).abs().max() > 1000 * TOL
    assert (lost - reference[key]).abs().max() > 1000 * TOL


@pytest.mark.slow
@needs_deepspeed
def test_the_final_model_folder_of_a_zero3_run_is_whole_and_loads(two_ranks):
    """Each rank held 1/2 of every weight: the folder make train saves holds them whole."""
    folder = two_ranks["folder"]
    check_model_folder(folder, require_tokenizer=False)
    loaded = load_model(folder).state_dict()
    trained = two_ranks[SAVED]
    assert loaded.keys() == trained.keys() - {"master.head.dictionary"}
    for name, value in loaded.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


# An Accelerate DeepSpeed launch cannot be built on a CPU-only machine: these fakes carry the
# attributes the check reads, as Accelerate sets them.
def _launch(kind: DistributedType, fsdp_version: int = 0, mixed_precision: str = "no",
            **zero) -> SimpleNamespace:
    config = {"zero_optimization": {"stage": 3} | zero}
    if mixed_precision == "fp16":
        config["fp16"] = {"enabled": True}
    return SimpleNamespace(
        distributed_type=kind, is_fsdp2=fsdp_version == 2, mixed_precision=mixed_precision,
        unwrap_model=lambda model: model,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


@pytest.mark.parametrize("launch, refused", [
    (_launch(DistributedType.DEEPSPEED), None),
    (_launch(DistributedType.DEEPSPEED, mixed_precision="bf16"), "DeepSpeed bf16"),
    (_launch(DistributedType.DEEPSPEED, offload_optimizer={"device": "none"}), None),
    (_launch(DistributedType.DEEPSPEED, offload_optimizer={"device": "cpu"},
             offload_param={"device": "cpu"}), None),
    (_launch(DistributedType.DEEPSPEED, mixed_precision="fp16"), "fp16 skips"),
    (_launch(DistributedType.DEEPSPEED, offload_optimizer={"device": "nvme"}),
     "offload_optimizer to nvme"),
    (_launch(DistributedType.DEEPSPEED, offload_param={"device": "nvme"}),
     "offload_param to nvme"),
], ids=["zero", "bf16", "no_offload", "cpu_offload", "fp16", "optimizer_nvme", "param_nvme"])
def test_deepspeed_launches_that_would_lose_the_local_update_are_refused(launch, refused):
    check_refusal(launch, refused)


def test_the_engine_refuses_fp16_deepspeed_only_when_a_local_rule_runs():
    model = tiny_model(learning="hybrid")
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    fp16 = _launch(DistributedType.DEEPSPEED, mixed_precision="fp16")
    with pytest.raises(ConfigError, match="DeepSpeed fp16"):
        Engine(fp16, model, opt, get_constant_schedule(opt), 1.0, local=model.local_learning())
    Engine(fp16, model, opt, get_constant_schedule(opt), 1.0, local=None)  # bptt: nothing lost


class Reached(Exception):
    """The run went past make_accelerator's check."""


@pytest.mark.parametrize("learning", ["hybrid", "bptt"])
def test_make_train_refuses_fp16_deepspeed_with_local_learning_at_start(
        learning, tmp_path, capsys, monkeypatch):
    def deepspeed(**kwargs):
        zero = _launch(DistributedType.DEEPSPEED, mixed_precision="fp16")
        zero.main_process_first = lambda: (_ for _ in ()).throw(Reached())
        return zero

    monkeypatch.setattr(precision, "new_accelerator", deepspeed)  # make_accelerator builds it
    argv = ["--no-wandb", "--config", str(Path(__file__).parent.parent / "configs/quick.yaml"),
            f"output_dir={tmp_path / 'run'}", "train.heads=[spiking_pc]",
            f"model.learning={learning}"]
    if learning == "bptt":  # no local update to lose: the run goes on
        with pytest.raises(Reached):
            command("train/train.py").main(argv)
        return
    assert command("train/train.py").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.learning: local learning") and "DeepSpeed fp16" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


if __name__ == "__main__":
    debug_launcher(_two_rank_worker, num_processes=2)
