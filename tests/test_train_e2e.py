"""End-to-end: the real MiniLM encoder on slices of the real corpora, through train/train.py."""

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridlm.checkpoints import file_checksums, read_progress, write_progress
from tests.conftest import command

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train" / "train.py")]
pytestmark = pytest.mark.slow


# Half the quick config's training tokens (4,096 per domain, 12 steps an epoch): enough to
# halve the perplexity and to kill, resume and compare, at half the time.
SMALL = ["data.max_train_tokens_per_domain=4096"]


@pytest.fixture(scope="module")
def data_cache():
    """The project's own cache (what `make train` uses): corpora and trunk features are
    content-keyed, so the tests build them once and later runs reuse them."""
    return str(ROOT / ".cache" / "hybridlm")


def run_train(out, cache, *extra, check=True, env=None):
    """Run train/train.py on the quick config; returns the finished process."""
    args = TRAIN + ["--config", "configs/quick.yaml", f"output_dir={out}",
                    f"data.cache_dir={cache}", *SMALL, *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env=(os.environ | (env or {})))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_here(out, cache, capsys, *extra) -> tuple[int, str]:
    """train/train.py's main in this process (for runs that refuse or stop early): the exit
    code and what it printed to stderr."""
    rc = command("train/train.py").main(["--config", "configs/quick.yaml", f"output_dir={out}",
                                         f"data.cache_dir={cache}", *SMALL, *extra])
    return rc, capsys.readouterr().err


def test_training_lowers_validation_loss_and_writes_results(tmp_path, data_cache, capsys):
    # (W&B logging and secrets kept out of every file: tests/test_wandb_offline.py)
    out = tmp_path / "run"
    # validates at steps 0, 12 and 24, on 1,024 tokens per domain and split
    rc, err = train_here(out, data_cache, capsys, "data.max_eval_tokens_per_domain=1024")
    assert rc == 0, err[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    for head in ("spiking_pc", "mlp"):
        m = json.loads((out / head / "metrics.json").read_text())
        first, last = m["history"][0], m["validation"]
        assert first["step"] == 0
        for domain in ("literature", "docs", "legal"):
            assert last[domain]["perplexity"] < 0.5 * first[f"eval/{domain}/perplexity"]
            assert m["test"][domain]["tokens"] > 0
        assert (out / head / "model" / "model.safetensors").is_file()
        assert (out / head / "model" / "tokenizer.json").is_file()
    heads = summary["heads"]
    diff = heads["spiking_pc"]["trainable_parameters"] - heads["mlp"]["trainable_parameters"]
    assert abs(diff) <= 385  # matched within half an MLP hidden unit (D + 1)
    # the baselines beside the heads, on the same blocks, in perplexity and bits per character
    for name in ("unigram", "kn_bigram", "trunk"):
        assert set(heads[name]["validation"]) == {"literature", "docs", "legal"}
    for name, m in heads.items():
        for r in m["validation"].values():
            assert r["bits_per_char"] == pytest.approx(
                r["loss"] / math.log(2) * r["tokens"] / chars_of(r), rel=1e-9), name
    assert heads["trunk"]["trainable_parameters"] == 0
    assert "| kn_bigram |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    cached = summary["feature_cache"]  # train + 2 splits x 3 domains, built or reused
    assert cached["entries_built"] + cached["entries_reused"] == 7
    # after BPTT training on real trunk states: sparse, far from saturation, and settled
    # below the energy it started from (issue 13's targets)
    for r in heads["spiking_pc"]["validation"].values():
        assert r["firing_rate"] <= 0.10 and r["max_neuron_rate"] <= 0.5
        assert r["relative_energy"] < 1.0
    sweep = heads["spiking_pc"]["time_sweep"]
    assert sorted(sweep, key=int) == ["1", "2", "4", "8"]  # T = 4 trained, scored at 1..8
    assert heads["spiking_pc"]["operations_per_token"]["sop"] > 0
    # every logged step once, in order (training rows and validations)
    rows = [json.loads(line) for line in (out / "spiking_pc" / "history.jsonl").open()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    n_steps = json.loads((out / "spiking_pc" / "metrics.json").read_text())["optimizer_steps"]
    assert n_steps == 24 and steps == list(range(1, n_steps + 1))
    assert [r["step"] for r in rows if "eval/docs/perplexity" in r] == [0, 12, 24]
    # the saved model evaluates the same way from its folder
    assert command("eval/evaluate.py").main([
        "--config", "configs/quick.yaml", "--model", str(out / "mlp" / "model"),
        f"data.cache_dir={data_cache}", *SMALL, "data.max_eval_tokens_per_domain=1024"]) == 0
    again = json.loads((out / "mlp" / "model.eval.json").read_text())
    for domain, r in heads["mlp"]["validation"].items():
        assert again["validation"][domain]["perplexity"] == pytest.approx(r["perplexity"],
                                                                          rel=1e-4)


def chars_of(r: dict) -> float:
    """The characters behind a result, recovered from its own bits per character."""
    return r["loss"] / math.log(2) * r["tokens"] / r["bits_per_char"]


def test_a_second_run_reuses_the_cached_trunk_features(tmp_path, data_cache, capsys):
    out = tmp_path / "again"
    trunk_only = ["train.heads=[trunk]", "data.max_eval_tokens_per_domain=512"]
    assert train_here(out, data_cache, capsys, *trunk_only)[0] == 0
    assert train_here(tmp_path / "again2", data_cache, capsys, *trunk_only)[0] == 0
    first = json.loads((out / "metrics.json").read_text())["feature_cache"]
    second = json.loads((tmp_path / "again2" / "metrics.json").read_text())["feature_cache"]
    assert second["entries_built"] == 0 and second["entries_reused"] == 7
    assert second["seconds_saved"] > 0 and second["bytes"] == first["bytes"]


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_killed_run_resumes_to_the_same_result(tmp_path, data_cache, capsys):
    common = ["train.heads=[spiking_pc]", "train.save_every=4", "train.epochs=1",
              "data.max_eval_tokens_per_domain=512"]  # a head finishes three times here
    whole = tmp_path / "whole"
    assert train_here(whole, data_cache, capsys, *common)[0] == 0  # uninterrupted, here
    part = tmp_path / "part"
    args = TRAIN + ["--config", "configs/quick.yaml", f"output_dir={part}",
                    f"data.cache_dir={data_cache}", *SMALL, *common]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = part / "spiking_pc" / "checkpoints"
    while time.time() < deadline and not list(ckpts.glob("step_0000008/progress.yaml")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "metrics.json").exists()
    # and the newest checkpoint is corrupt: resuming must notice and take the one before
    newest = sorted(ckpts.glob("step_*/progress.yaml"))[-1].parent
    newest_step = int(newest.name.removeprefix("step_"))
    newest = newest / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0xFF
    newest.write_bytes(bytes(data))
    # checkpoints hold what trains, not the frozen trunk (rebuilt from the pretrained weights)
    saved = load_file(ckpts / "step_0000004" / "model.safetensors")
    assert saved and not any(k.startswith("encoder.") for k in saved)
    resumed = run_train(part, data_cache, *common, "--resume")
    assert "skipped: model.safetensors does not match its checksum" in resumed.stderr
    # bit for bit: weights, losses, perplexities and the order of the batches trained on
    a, b = (load_file(run / "spiking_pc" / "model" / "model.safetensors") for run in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (json.loads((run / "spiking_pc" / "metrics.json").read_text()) for run in (whole, part))
    for key in a.keys() - {"epoch_seconds", "resumes"}:
        assert a[key] == b[key], key
    assert [r["from_step"] for r in b["resumes"]] == [newest_step - 4]
    assert 0 < b["resumes"][0]["seconds_to_first_step"] < 120

    # killed after its final checkpoint, before metrics.json was complete (a damaged file
    # reads as missing): the resume only evaluates
    done = part / "spiking_pc" / "metrics.json"
    done.write_text(done.read_text()[:100])
    assert train_here(part, data_cache, capsys, *common, "--resume")[0] == 0
    b = json.loads((part / "spiking_pc" / "metrics.json").read_text())
    for key in a.keys() - {"epoch_seconds", "resumes"}:
        assert a[key] == b[key], key

    # a checkpoint whose optimizer state would run code when unpickled (checksums updated, as
    # an attacker would) is refused by torch.load(weights_only=True): the code never runs
    marker = tmp_path / "pwned"
    newest = sorted(ckpts.glob("step_*"))[-1]
    (newest / "optimizer.bin").write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=2))
    state = read_progress(newest)
    state["files"] = file_checksums(newest)
    write_progress(newest, state)
    (part / "spiking_pc" / "metrics.json").unlink()
    rc, err = train_here(part, data_cache, capsys, *common, "--resume")
    assert rc == 2, err[-2000:]
    assert "cannot be loaded into this model (UnpicklingError" in err
    assert not marker.exists()

    # a checkpoint of another head (model type) is refused before anything is touched
    other = tmp_path / "other"
    (other / "mlp").mkdir(parents=True)
    shutil.copytree(ckpts, other / "mlp" / "checkpoints")
    rc, err = train_here(other, data_cache, capsys, "train.heads=[mlp]",
                         "data.max_eval_tokens_per_domain=512", "--resume")
    assert rc == 2, err[-2000:]
    assert "was trained with another head than this run" in err
    assert sorted(p.name for p in other.iterdir()) == [".lock", "mlp"]  # the lock it took


@pytest.mark.parametrize("override, message", [
    ("model.encoder=/no/such/encoder", "trunk folder '/no/such/encoder' does not exist"),
    ("model.encoder=BAD_GGUF", "bad.gguf' is not a readable GGUF model"),
    ("data.block_size=1024", "data.block_size"),
    ("data.domains=[{name: x, source: 'files:/no/such/*.txt'}]", "no file matches"),
    ("model.time_steps=0", "model.time_steps"),
])
def test_bad_input_exits_cleanly_and_writes_nothing(tmp_path, data_cache, capsys, override,
                                                    message):
    out = tmp_path / "bad"
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(100))  # a truncated GGUF file
    override = override.replace("BAD_GGUF", str(tmp_path / "bad.gguf"))
    rc, err = train_here(out, data_cache, capsys, override)
    assert rc == 2
    assert message in err
    assert not out.exists()


def test_existing_output_dir_is_left_untouched(tmp_path, data_cache, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    rc, err = train_here(out, data_cache, capsys)
    assert rc == 2 and "--resume" in err
    assert (out / "metrics.json").read_text() == "{}"


# Two processes (DDP through configs/accelerate/ddp.yaml) and two torchrun nodes killed and
# relaunched: tests/test_launch.py.


def test_diverging_run_stops_with_a_clear_error(tmp_path, data_cache, capsys):
    out = tmp_path / "nan"
    rc, err = train_here(out, data_cache, capsys, "train.lr=1e30", "train.heads=[mlp]",
                         "train.epochs=1", "train.warmup_fraction=0",
                         "data.max_eval_tokens_per_domain=512", "--no-wandb")
    assert rc == 3, err[-2000:]
    assert "NaN/inf for 10 steps in a row" in err
