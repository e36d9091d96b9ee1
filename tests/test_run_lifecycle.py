"""A run folder's life: locked while a run uses it, checked before anything is written, taken
over when a run left no results, resumed only as the same run on the same data, and never left
half-written. Most tests stop `train/train.py` before it trains; the few that train call
`train_head` on a tiny random Llama trunk (no download)."""

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from hybridlm import engine
from hybridlm.checkpoints import blocks_sha256
from hybridlm.config import ConfigError, load_config
from hybridlm.evaluation import Blocks
from hybridlm.rundir import RunDir, config_differences
from hybridlm.training import IndexedBlocks, train_head
from tests.conftest import command

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "configs" / "quick.yaml"
TINY = ["data.max_train_tokens_per_domain=512", "train.heads=[mlp]", "train.epochs=1"]


class Reached(Exception):
    """Raised where a test stops the run: the checks before it passed."""


def train_main(out, capsys, *extra) -> tuple[int, str]:
    """train/train.py's main on the quick config: exit code and stderr."""
    rc = command("train/train.py").main(["--no-wandb", "--config", str(QUICK), f"output_dir={out}",
                                         f"data.cache_dir={ROOT / '.cache' / 'hybridlm'}",
                                         *TINY, *extra])
    return rc, capsys.readouterr().err


@pytest.fixture
def stop_after_checks(monkeypatch):
    """Stop train/train.py right after its output_dir checks, before it loads anything."""
    def reached(cfg):
        raise Reached
    monkeypatch.setattr(command("train/train.py"), "make_accelerator", reached)


def _leftovers(out: Path) -> None:
    """What a run that stopped before its first checkpoint leaves."""
    (out / "mlp").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"seed": -1}))
    (out / ".lock").write_text("pid 1 on elsewhere\n")
    (out / "wandb" / "offline-run-x").mkdir(parents=True)
    (out / "mlp" / "history.jsonl").write_text('{"step": 0}\n')


def _finished_head(out: Path, overrides: list[str]) -> None:
    """A folder holding a run's results (one finished head) and the config it ran with."""
    cfg = load_config(QUICK, [f"output_dir={out}", *TINY, *overrides])
    (out / "mlp").mkdir(parents=True)
    (out / "mlp" / "metrics.json").write_text("{}")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---- class 3: one run at a time in a folder ---------------------------------------------------
def test_a_locked_run_folder_refuses_a_second_run_and_names_the_holder(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        assert f"pid {os.getpid()}" in run.lock_file.read_text()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on"):
            with RunDir(tmp_path / "run").lock():
                pass
    with run.lock():  # released when the first run ended
        pass
    assert not run.holds_results()  # the lock file is not a result


@contextmanager
def held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """The run folder's lock held by another process, as a run would hold it."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 12345 on elsewhere')\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_blocks_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    with held_elsewhere(run.root) as holder:
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 12345 on elsewhere"):
            with run.lock():
                pass
        holder.kill()
        holder.wait()
        with run.lock():
            pass


def test_train_refuses_a_folder_another_run_holds(tmp_path, capsys):
    out = tmp_path / "run"
    with held_elsewhere(out):
        rc, err = train_main(out, capsys)
    assert rc == 2, err[-2000:]
    assert "in use by another run (pid 12345 on elsewhere)" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---- class 5: a run that stopped before its first checkpoint blocks nothing ------------------
def test_a_folder_without_results_is_taken_over(tmp_path, capsys, stop_after_checks):
    out = tmp_path / "run"
    _leftovers(out)
    with pytest.raises(Reached):  # a fresh run, and --resume with another config
        train_main(out, capsys)
    with pytest.raises(Reached):
        train_main(out, capsys, "--resume")
    assert not RunDir(out).holds_results()
    for result in ("mlp/metrics.json", "mlp/checkpoints/step_0000001/x", "notes.txt"):
        (out / result).parent.mkdir(parents=True, exist_ok=True)
        (out / result).write_text("{}")
        assert RunDir(out).holds_results(), result
        rc, err = train_main(out, capsys)
        assert rc == 2 and "already holds files" in err
        (out / result).unlink()


# ---- class 7: the same run spelled another way; another config named by its keys ------------
def test_resume_takes_the_same_folder_spelled_another_way(tmp_path, capsys, monkeypatch,
                                                          stop_after_checks):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [f"data.domains=[{{name: own, source: 'files:{corpus}/*.txt'}}]"]
    _finished_head(tmp_path / "runs" / "a", files)
    monkeypatch.chdir(tmp_path / "runs")
    relative = ["data.domains=[{name: own, source: 'files:../corpus/*.txt'}]"]
    with pytest.raises(Reached):
        train_main("../runs/a", capsys, *relative, "--resume")
    (tmp_path / "runs" / "a").rename(tmp_path / "moved")  # a moved run folder is the same run
    with pytest.raises(Reached):
        train_main(tmp_path / "moved", capsys, *files, "--resume")
    rc, err = train_main(tmp_path / "moved", capsys, *files, "train.lr=0.5", "--resume")
    assert rc == 2 and "another config" in err and "train.lr: 0.003 -> 0.5" in err


def test_config_differences_are_named_and_bounded():
    saved = {"output_dir": "runs/a", "seed": 0, "model": {"encoder": "minilm"},
             "data": {"domains": [{"name": "a", "source": "files:x/*.txt"}]}}
    assert config_differences(saved, saved | {"output_dir": "/elsewhere"}) == []
    huge = saved | {"seed": 10 ** 500, "model": {"encoder": "other"}}
    differ = config_differences(saved, huge)
    assert differ[0] == "model.encoder: 'minilm' -> 'other'"
    assert differ[1].startswith("seed: 0 -> 1000") and len(differ[1]) < 80
    many = {f"k{i}": i for i in range(20)}
    assert config_differences({}, many)[-1] == "and 15 more"


def test_blocks_hash_changes_with_any_token():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 3,
                                     "attention_mask": [[1] * 4] * 3, "chars": [[1] * 4] * 3})
    blocks = Blocks(ds)
    before = blocks_sha256([blocks])
    blocks.ids[2, 3] = 5
    assert blocks_sha256([blocks]) != before


# ---- class 8: errors as error lines, what to do, nothing lost --------------------------------
def test_a_corrupt_config_yaml_on_resume_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    _finished_head(out, [])
    (out / "config.yaml").write_text("seed: [unclosed\n")
    rc, err = train_main(out, capsys, "--resume")
    assert rc == 2 and "config.yaml is unreadable" in err and "delete it" in err


def test_ctrl_c_says_how_to_resume(capsys, tmp_path, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(command("train/train.py"), "make_accelerator", interrupted)
    rc, err = train_main(tmp_path / "run", capsys)
    assert rc == 130 and "--resume" in err and "Traceback" not in err


def test_a_failed_write_during_the_run_is_an_error_line(capsys, tmp_path, monkeypatch):
    def full(args, held):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))
    monkeypatch.setattr(command("train/train.py"), "run_training", full)
    rc, err = train_main(tmp_path / "run", capsys)
    assert rc == 2 and err.startswith("error: [Errno 28] No space left on device")
    assert "--resume" in err


def test_an_output_dir_that_cannot_be_written_is_an_error_line(tmp_path, capsys):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    rc, err = train_main(tmp_path / "gone", capsys)
    assert rc == 2 and "is a link to" in err and "which does not exist" in err
    (tmp_path / "file").write_text("")
    rc, err = train_main(tmp_path / "file", capsys)
    assert rc == 2 and "is a file, not a folder" in err
    with pytest.raises(ConfigError, match="cannot be written"):
        with RunDir(tmp_path / "file" / "run").lock():
            pass


# ---- training on a tiny random trunk: a run that never trained, a failed final save ----------
class _Tokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, folder):
        if self.fail:  # the disk filled up after the weights were written
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        (Path(folder) / "tokenizer.json").write_text("{}")


def _tiny_run(tmp_path, tiny_llama, tokenizer=None):
    """`train_head` of an MLP head on 8 blocks of random tokens (2 batches) with the tiny
    Llama trunk: returns the run folder, or raises what training raised."""
    cfg = load_config(QUICK, [f"output_dir={tmp_path / 'run'}", f"model.encoder={tiny_llama}",
                              "model.n_neurons=16", "data.block_size=16", "train.batch_size=4",
                              *TINY, "train.cache_features=false"])
    torch.manual_seed(0)
    ids = torch.randint(5, 120, (8, 16)).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 8,
                                     "chars": [[2] * 16] * 8})
    blocks = Blocks(ds)
    splits = {"train": IndexedBlocks([blocks]), "train_tokens": blocks.tokens(),
              "validation": {"d": blocks}, "test": {"d": blocks}}
    run = RunDir(cfg.output_dir)
    train_head("mlp", cfg, splits, {}, tokenizer or _Tokenizer(), run, {"head": "mlp"},
               use_wandb=False)
    return run


def test_a_run_that_never_trained_fails_and_saves_no_model(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(engine.Engine, "all_finite", lambda self, loss: False)
    with pytest.raises(FloatingPointError, match="no training step was taken"):
        _tiny_run(tmp_path, tiny_llama[True])
    run = RunDir(tmp_path / "run")
    assert not run.model("mlp").exists() and not run.metrics("mlp").exists()
    assert not run.holds_results()  # and the next run may take the folder


def test_the_model_folder_is_never_half_written(tmp_path, tiny_llama):
    with pytest.raises(OSError, match="No space left"):
        _tiny_run(tmp_path, tiny_llama[True], _Tokenizer(fail=True))
    run = RunDir(tmp_path / "run")
    assert not run.model("mlp").exists()
    assert [p.name for p in (tmp_path / "run" / "mlp").iterdir() if "model" in p.name] == []
