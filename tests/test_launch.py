"""Launches: the shipped Accelerate configs, launches refused before they start or at start-up,
a resume under another launch, and two torchrun "nodes" on this host killed and relaunched."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from hybridlm import launch
from hybridlm.checkpoints import read_progress, resume_point, run_identity
from hybridlm.config import ConfigError
from tests.test_checkpoints import _checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
UNREACHABLE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): routed nowhere


def unknown_keys(path: Path) -> list[str]:
    """Keys of an Accelerate config that Accelerate does not know: top-level keys are
    ClusterConfig's fields (it raises on others); the keys of its nested sections become
    `accelerate launch` options (fsdp_config.x -> --fsdp_x, dynamo_config.x -> --dynamo_x,
    others as they are), which the launcher would otherwise ignore silently."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        load_config_from_file(str(path))
    except ValueError as e:
        return [str(e)]
    options = {a.dest for a in launch_command_parser()._actions}
    prefix = {"fsdp_config": "fsdp_", "dynamo_config": "dynamo_", "fp8_config": "fp8_"}
    unknown = []
    for section, values in yaml.safe_load(path.read_text()).items():
        if isinstance(values, dict):
            p = prefix.get(section, "")
            unknown += [f"{section}.{k}" for k in values
                        if (k if k.startswith(p) else p + k) not in options]
    return unknown


def test_every_shipped_accelerate_config_is_one_accelerate_knows(tmp_path):
    assert {"ddp.yaml", "fsdp2.yaml", "multinode.yaml"} <= {p.name for p in CONFIGS}
    for path in CONFIGS:
        assert unknown_keys(path) == [], path.name
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())
    assert fsdp["fsdp_config"]["fsdp_version"] == 2  # Accelerate's default is still 1
    node = yaml.safe_load((ROOT / "configs/accelerate/multinode.yaml").read_text())
    assert node["num_machines"] == 2 and node["rdzv_backend"] == "c10d"
    # the check itself catches a misspelt key, at either level
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/accelerate/fsdp2.yaml").read_text()
                   .replace("fsdp_version", "fsdp_versoin"))
    assert unknown_keys(bad) == ["fsdp_config.fsdp_versoin"]
    bad.write_text((ROOT / "configs/accelerate/ddp.yaml").read_text() + "num_proceses: 2\n")
    assert "num_proceses" in unknown_keys(bad)[0]


# ---- refused at start-up: what Accelerate would run is not what was launched ---------------
def test_a_torchrun_rank_that_accelerate_would_run_alone_is_refused():
    # torchrun started 2 processes; Accelerate (without cpu=True on a machine without a GPU)
    # runs this one as a single process: the check that refuses it. (new_accelerator passes
    # cpu=True there: the two-node test below runs torchrun ranks through it.)
    with pytest.raises(ConfigError, match=r"started 2 processes \(WORLD_SIZE=2\), but "
                                          r"Accelerate runs this one as 1 of 1 \(NO\)"):
        launch.check_launch(Accelerator(cpu=True), {"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    launch.check_launch(Accelerator(cpu=True), {"WORLD_SIZE": "1"})  # what it was asked


def test_an_fsdp_or_deepspeed_launch_run_as_another_engine_is_refused(monkeypatch):
    # what `accelerate launch --use_fsdp` sets; on CPU Accelerate runs it as plain DDP (here:
    # one process), never as FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=r"an FSDP launch \(ACCELERATE_USE_FSDP=true\) that "
                                          r"Accelerate runs as one process \(NO\)"):
        launch.new_accelerator()
    # DeepSpeed's flag is ignored under cpu=True (Accelerate needs the package to read it
    # at all: the check is given the environment here)
    with pytest.raises(ConfigError, match=r"a DeepSpeed launch"):
        launch.check_launch(Accelerator(cpu=True), {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_resume_under_another_launch_is_refused_naming_both(tmp_path):
    def identity(processes, engine):
        return run_identity("hybridlm", "spiking_pc", {"n_neurons": 8}, {"vocab_size": 3},
                            "t" * 64, {"docs": "d" * 64}, {"processes": processes,
                                                          "engine": engine})

    ours = identity(2, "DDP")
    folder = _checkpoint(tmp_path, 4, identity=ours)
    assert resume_point(tmp_path, ours) == folder
    with pytest.raises(ConfigError, match="made by 2 processes under DDP, this launch is 1 "
                                          "process under one process"):
        resume_point(tmp_path, identity(1, "one process"))
    with pytest.raises(ConfigError, match="made by 2 processes under DDP, this launch is 2 "
                                          "processes under FSDP2"):
        resume_point(tmp_path, identity(2, "FSDP2"))


# ---- refused before anything starts: python -m hybridlm.launch -----------------------------
@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    """A launch the front accepts replaces its process by the launcher: never this one."""
    def refuse(*args):
        raise AssertionError(f"the launch was accepted and would start: {args[1]}")

    monkeypatch.setattr(launch.os, "execv", refuse)


def front(capsys, *argv) -> tuple[int, str]:
    """`python -m hybridlm.launch` in this process, on a launch it must refuse."""
    rc = launch.main([*argv])
    return rc, capsys.readouterr().err


def script(out: Path) -> list[str]:
    return ["train/train.py", "--config", "configs/quick.yaml", f"output_dir={out}", "--resume"]


def test_a_multinode_launch_without_a_rendezvous_endpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = front(capsys, "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", *script(out))
    assert rc == 2 and "the rendezvous endpoint is missing: pass --rdzv-endpoint" in err
    rc, err = front(capsys, "torchrun", "--nnodes", "2", "--nproc-per-node", "1", *script(out))
    assert rc == 2 and "--master-addr HOST with the static backend" in err
    rc, err = front(capsys, "accelerate", "--config_file", "configs/accelerate/multinode.yaml",
                    "--machine_rank", "1", *script(out))
    assert rc == 2 and "the rendezvous endpoint is missing: set main_process_ip" in err
    assert not out.exists()


def test_an_unreachable_rendezvous_endpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    start = time.monotonic()
    rc, err = front(capsys, "--wait", "1", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{UNREACHABLE}:29400",
                    *script(out))
    assert rc == 2
    assert f"endpoint {UNREACHABLE}:29400 (--rdzv-endpoint) accepted no connection in 1 s" in err
    rc, err = front(capsys, "--wait", "1", "accelerate", "--config_file",
                    "configs/accelerate/multinode.yaml", "--machine_rank", "1",
                    "--main_process_ip", UNREACHABLE, *script(out))
    assert rc == 2 and f"endpoint {UNREACHABLE}:29500 (main_process_ip) accepted no" in err
    rc, err = front(capsys, "torchrun", "--nnodes", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "no-such-host.invalid:29400", *script(out))
    assert rc == 2 and "no-such-host.invalid:29400 (--rdzv-endpoint) does not resolve" in err
    assert time.monotonic() - start < 30
    assert not out.exists()


def test_accelerate_launches_that_would_run_something_else_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = front(capsys, "accelerate", "--cpu", "--num_processes", "2", *script(out))
    assert rc == 2 and "num_processes 2, but this launch starts one process" in err
    if not launch.has_accelerator():
        rc, err = front(capsys, "accelerate", "--config_file", "configs/accelerate/fsdp2.yaml",
                        *script(out))
        assert rc == 2 and "FSDP through Accelerate needs a GPU per process" in err
    assert not out.exists()
    # what make train NPROC=2 runs is accepted, and handed to accelerate launch unchanged
    argv = ["--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2", *script(out)]
    with pytest.raises(AssertionError, match="accepted and would start"):
        launch.main(["accelerate", *argv])


# ---- two nodes on this host: killed after the first checkpoint, relaunched with --resume ----
TRAIN_ARGS = ["--config", "configs/quick.yaml", "data.max_train_tokens_per_domain=2048",
              "data.max_eval_tokens_per_domain=512", "train.heads=[spiking_pc]",
              "train.epochs=1", "train.save_every=1", "model.learning=hybrid", "--no-wandb",
              "--resume"]  # the restart hook: starts cleanly when there is no checkpoint yet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers (torchrun starts them in sessions of their own)."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.scale  # make test-scale (CI runs it after make test)
def test_two_nodes_killed_and_relaunched_finish_like_an_uninterrupted_run(tmp_path):
    cache = f"data.cache_dir={ROOT / '.cache' / 'hybridlm'}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    front_ = [sys.executable, "-m", "hybridlm.launch"]
    # the reference: make train NPROC=2's launch (configs/accelerate/ddp.yaml, no
    # ACCELERATE_USE_CPU: two CPU ranks because hybridlm passes cpu=True), uninterrupted
    ref = tmp_path / "ref"
    proc = subprocess.run(front_ + ["accelerate", "--config_file", "configs/accelerate/ddp.yaml",
                                    "train/train.py", *TRAIN_ARGS, f"output_dir={ref}", cache],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ref / "metrics.json").read_text())
    assert summary["processes"] == 2
    assert summary["heads"]["spiking_pc"]["ranks_identical"] is True
    assert summary["heads"]["spiking_pc"]["learning"] == "hybrid"

    out = tmp_path / "nodes"

    def node(rank: int, port: int, log: str) -> subprocess.Popen:
        """One "machine": torchrun, one process, the c10d store on localhost:port (hosted by
        node 0's launcher)."""
        args = front_ + ["torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                         "--rdzv-conf", f"is_host={str(rank == 0).lower()}",
                         "--max-restarts", "0", "train/train.py", *TRAIN_ARGS,
                         f"output_dir={out}", cache]
        with open(tmp_path / log, "w") as f:
            return subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    port = free_port()
    first = [node(0, port, "node0.log"), node(1, port, "node1.log")]
    ckpts = out / "spiking_pc" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("step_*/progress.yaml")):
        assert all(p.poll() is None for p in first), (tmp_path / "node0.log").read_text()[-3000:]
        time.sleep(0.05)
    kill_tree(first[1])  # node 1 is lost: node 0's rank fails on its next all-reduce
    assert first[0].wait(timeout=120) != 0
    assert not (out / "spiking_pc" / "metrics.json").exists()

    port = free_port()  # the same commands again, on both nodes
    second = [node(0, port, "node0b.log"), node(1, port, "node1b.log")]
    for p, log in zip(second, ("node0b.log", "node1b.log"), strict=True):
        assert p.wait(timeout=300) == 0, (tmp_path / log).read_text()[-3000:]

    a, b = (json.loads((run / "spiking_pc" / "metrics.json").read_text()) for run in (ref, out))
    assert b["ranks_identical"] is True and b["optimizer_steps"] == a["optimizer_steps"] == 3
    assert b["resumes"] and b["resumes"][0]["from_step"] >= 1  # it did restart from a checkpoint
    assert b["data_sha256"] == a["data_sha256"]  # the same batches, in the same order
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    # the checkpoints record the launch: a resume under another one is refused
    newest = sorted(ckpts.glob("step_*"))[-1]
    assert read_progress(newest)["identity"]["launch"] == {"processes": 2, "engine": "DDP"}
    # and the same model, bit for bit, as the uninterrupted run
    wa, wb = (load_file(run / "spiking_pc" / "model" / "model.safetensors") for run in (ref, out))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
