"""How a run is launched (one process, DDP, FSDP2, ..., on one machine or several), and the
launches that would run something other than what was asked, refused.

Two halves, one per side of the launcher:

- Inside each process: `new_accelerator` builds the `Accelerator` and refuses a launch that
  Accelerate silently turned into something else (`check_launch`); `launch_identity` is what a
  checkpoint records of the launch (processes, engine), so a resume under another one is
  refused.
- Before any process starts: `python -m hybridlm.launch accelerate|torchrun ARGS...` reads
  ARGS with the launcher's own parser, refuses a launch that would start fewer processes than
  asked, an engine this machine cannot run, or a multi-node launch whose rendezvous endpoint is
  missing or unreachable (torchrun would wait for its join timeout, 10 minutes, or forever),
  then replaces itself by the launcher with ARGS unchanged. Nothing is written before it.

Traps found on CPU-only machines (docs/scaling.md):
  torchrun + `Accelerator()`         each process runs alone (no GPU: Accelerate's distributed
                                     CPU mode needs cpu=True); fixed here: cpu=True
  `ACCELERATE_USE_FSDP` on CPU       Accelerate runs DDP (it promotes only GPU launches to FSDP)
  `ACCELERATE_USE_DEEPSPEED` on CPU  ignored under cpu=True: DDP
  `--cpu --num_processes 2`,         the simple launcher: one process
  `distributed_type: MULTI_CPU`
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from hybridlm.config import ConfigError

# what the engines are called in messages and in a checkpoint's identity
ONE_PROCESS, DDP = "one process", "DDP"


def has_accelerator() -> bool:
    """True when torch sees a GPU (or another accelerator device)."""
    return torch.accelerator.is_available()


def new_accelerator(**kwargs) -> Accelerator:
    """`Accelerator(**kwargs)` for this launch, checked (`check_launch`). Without an accelerator
    device, cpu=True: Accelerate then runs the launched processes as CPU ranks (gloo);
    without it, each process of a torchrun launch runs alone, on all the data."""
    kwargs.setdefault("cpu", not has_accelerator())
    accelerator = Accelerator(**kwargs)
    check_launch(accelerator)
    return accelerator


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_launch(accelerator: Accelerator, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch that Accelerate runs as something else than the launcher asked for:
    another number of processes than WORLD_SIZE, or an FSDP / DeepSpeed launch run as
    another engine. Raises ConfigError naming both and what to do."""
    asked = int(environ.get("WORLD_SIZE", "1") or 1)
    got = accelerator.num_processes
    if asked != got:
        raise ConfigError(
            f"launch: the launcher started {asked} processes (WORLD_SIZE={asked}), but "
            f"Accelerate runs this one as {got} of {got} ({accelerator.distributed_type.value}):"
            " each process would train alone on all the data. Launch with `accelerate launch "
            "--config_file configs/accelerate/ddp.yaml` or torchrun, unchanged otherwise "
            "(hybridlm passes cpu=True when there is no GPU); nothing was started")
    for variable, kind, name in (("ACCELERATE_USE_FSDP", DistributedType.FSDP, "an FSDP"),
                                 ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED,
                                  "a DeepSpeed")):
        if _flag(environ, variable) and accelerator.distributed_type != kind:
            where = "" if has_accelerator() else " (Accelerate runs it on GPUs only; this " \
                "machine has none)"
            raise ConfigError(
                f"launch: {name} launch ({variable}=true) that Accelerate runs as "
                f"{engine_name(accelerator)} ({accelerator.distributed_type.value}){where}. "
                "Launch with a GPU per process, or with configs/accelerate/ddp.yaml; nothing "
                "was started")


def engine_name(accelerator: Accelerator) -> str:
    """The engine a run trains under: 'one process', 'DDP', 'FSDP2', 'FSDP1', 'DeepSpeed
    ZeRO-2', ... (the value of Accelerate's distributed_type for any other)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return ONE_PROCESS
    if kind.name.startswith("MULTI_"):
        return DDP
    if kind == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP1"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return kind.value


def launch_identity(accelerator: Accelerator) -> dict:
    """What a checkpoint records of its launch; a resume under another one is refused (the
    batches each rank draws, and how the state is sharded, depend on both)."""
    return {"processes": accelerator.num_processes, "engine": engine_name(accelerator)}


def describe(launch: dict) -> str:
    """`launch_identity` in words: '2 processes under DDP'."""
    n = launch.get("processes")
    return f"{n} process{'es' if n != 1 else ''} under {launch.get('engine')}"


# ---- before the processes start: `python -m hybridlm.launch accelerate|torchrun ARGS` --------
class LaunchError(ValueError):
    """A launch refused before it starts: what is wrong and what to do."""


def _is_this_machine(host: str) -> bool:
    """True when `host` names this machine (a loopback address, its hostname, or one of its
    addresses): the node that hosts the rendezvous."""
    import psutil

    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(wanted & mine)


def check_endpoint(host: str, port: int, wait: float, how: str) -> None:
    """Refuse an endpoint that does not resolve, or (when another machine hosts it) does not
    accept a TCP connection within `wait` seconds. `how`: the option or key that gave it."""
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(
            f"the rendezvous endpoint {host}:{port} ({how}) does not resolve ({e}): give the "
            "address of the node with rank 0; nothing was started") from None
    if _is_this_machine(host):
        return  # this node hosts the rendezvous store
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(
                    2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"the rendezvous endpoint {host}:{port} ({how}) accepted no connection in "
                    f"{wait:g} s ({e.strerror or e}): start the node with rank 0 (it hosts the "
                    "endpoint) first, check the address, port and firewall, or wait longer "
                    "(--wait SECONDS); nothing was started") from None
            time.sleep(0.5)


def _given(argv: list[str], *names: str) -> bool:
    """True when an option of `names` appears in `argv` (as `--x v` or `--x=v`)."""
    return any(a in names or a.split("=", 1)[0] in names for a in argv)


def check_torchrun(argv: list[str], wait: float) -> None:
    """Refuse a multi-node torchrun launch without a rendezvous endpoint, or with one that
    is unreachable."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    nodes = str(args.nnodes).split(":")[-1]
    if args.standalone or not nodes.isdigit() or int(nodes) <= 1:
        return
    if args.rdzv_backend == "static":
        if not _given(argv[:argv.index(args.training_script)], "--master-addr",
                      "--master_addr"):
            raise LaunchError(
                f"torchrun --nnodes {args.nnodes}: the rendezvous endpoint is missing: pass "
                "--rdzv-backend c10d --rdzv-endpoint HOST:PORT (HOST: the node with rank 0), "
                "or --master-addr HOST with the static backend; without it every node waits "
                "for the others on its own loopback address. Nothing was started")
        check_endpoint(args.master_addr, int(args.master_port or 29500), wait, "--master-addr")
        return
    if not args.rdzv_endpoint:
        raise LaunchError(
            f"torchrun --nnodes {args.nnodes} --rdzv-backend {args.rdzv_backend}: the "
            "rendezvous endpoint is missing: pass --rdzv-endpoint HOST:PORT (HOST: the node "
            "with rank 0, the same on every node); without it every node waits for the others "
            "on its own address. Nothing was started")
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        host, port = args.rdzv_endpoint, "29400"  # torchrun's default c10d port
    check_endpoint(host.strip("[]"), int(port), wait, "--rdzv-endpoint")


def check_accelerate(argv: list[str], wait: float) -> None:
    """Refuse an `accelerate launch` (its config file merged with its options, as Accelerate
    does) that would start fewer processes than asked, an engine that needs GPUs on a
    machine without one, or several machines without a reachable main_process_ip."""
    import logging

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)
    try:
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        raise LaunchError(f"accelerate launch: {e}") from None
    source = f"--config_file {args.config_file}" if args.config_file else "accelerate launch"
    gpu_only = [name for name, on in (("FSDP", args.use_fsdp), ("DeepSpeed", args.use_deepspeed),
                                      ("Megatron-LM", args.use_megatron_lm)) if on]
    if gpu_only and not has_accelerator():
        raise LaunchError(
            f"{source}: {gpu_only[0]} through Accelerate needs a GPU per process and this "
            "machine has none (Accelerate would run plain DDP or fail): launch with "
            "configs/accelerate/ddp.yaml here, or on GPUs; nothing was started")
    n = int(args.num_processes or 1)
    several = args.multi_gpu or gpu_only or args.tpu
    if n > 1 and not several and not getattr(args, "mpirun_hostfile", None):
        raise LaunchError(
            f"{source}: num_processes {n}, but this launch starts one process (Accelerate's "
            "simple launcher: --cpu, or distributed_type MULTI_CPU without mpirun): use "
            "distributed_type MULTI_GPU as configs/accelerate/ddp.yaml does (hybridlm runs "
            "it as CPU ranks when there is no GPU); nothing was started")
    if int(args.num_machines or 1) > 1:
        if not args.main_process_ip:
            raise LaunchError(
                f"{source}: num_machines {args.num_machines}, but the rendezvous endpoint is "
                "missing: set main_process_ip (and main_process_port) in the config, or pass "
                "--main_process_ip HOST (the machine with machine_rank 0, the same on every "
                "machine; make: LAUNCH_ARGS=\"--machine_rank R --main_process_ip HOST\"); "
                "nothing was started")
        check_endpoint(args.main_process_ip, int(args.main_process_port or 29500), wait,
                       "main_process_ip")


LAUNCHERS = {"accelerate": (check_accelerate, "accelerate.commands.launch"),
             "torchrun": (check_torchrun, "torch.distributed.run")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hybridlm.launch", allow_abbrev=False,
        description="Check a launch, then run it: python -m hybridlm.launch torchrun --nnodes 2 "
                    "--nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
                    "train/train.py --config configs/default.yaml --resume")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds a node waits for another machine's rendezvous endpoint")
    p.add_argument("launcher", choices=sorted(LAUNCHERS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the launcher's own arguments")
    a = p.parse_args(argv)
    check, module = LAUNCHERS[a.launcher]
    try:
        check(a.args, a.wait)
    except (LaunchError, SystemExit) as e:
        if isinstance(e, SystemExit):  # the launcher's parser already printed why
            return 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *a.args])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
