"""Resume overhead of the default model: from starting `train/train.py --resume` to the end of
its first new optimizer step (imports, data from the cache, model, checkpoint load and check,
the first step with a cold feature cache).

    python bench/bench_resume.py [--out bench/results/bench_resume.json] [--repeats 3]

A run of configs/default.yaml (spiking_pc head) is started, killed with SIGKILL once its step-2
checkpoint is written, then restarted `--repeats` times with --resume; each restart is killed
as soon as it reports its first new step. Target: under 30 s. Writes JSON: the wall-clock
time measured here and the one train.py measured from its process start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"resumed: first new step (\d+) done ([\d.]+) s after the process started")


def train(out: Path, config: str, log, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "train/train.py", "--config", config, "--no-wandb",
            f"output_dir={out}", "train.heads=[spiking_pc]", "train.save_every=2"]
    return subprocess.Popen(args + (["--resume"] if resume else []), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/bench_resume.json")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        with open(Path(tmp) / "first.log", "w") as log:
            proc = train(out, args.config, log, resume=False)
            ckpt = out / "spiking_pc" / "checkpoints" / "step_0000002" / "progress.yaml"
            while not ckpt.is_file():
                if proc.poll() is not None:
                    sys.exit("the first run ended early:\n" + (Path(tmp) / "first.log").read_text())
                time.sleep(0.05)
            kill(proc)
        for i in range(args.repeats):
            start = time.perf_counter()
            proc = train(out, args.config, subprocess.PIPE, resume=True)
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if match := MARKER.search(line):
                    wall = time.perf_counter() - start
                    kill(proc)
                    runs.append({"wall_seconds": wall, "first_new_step": int(match[1]),
                                 "seconds_measured_by_train_py": float(match[2])})
                    print(f"restart {i + 1}: first new step {match[1]} after {wall:.1f} s")
                    break
            else:
                sys.exit("the resumed run never reported its first step:\n" + "".join(lines))

    median = statistics.median(r["wall_seconds"] for r in runs)
    result = {
        "config": args.config,
        "head": "spiking_pc",
        "resume_seconds_median": median,
        "restarts": runs,
        "target_seconds": 30.0,
        "under_target": median < 30.0,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
