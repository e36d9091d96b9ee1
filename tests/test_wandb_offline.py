"""Offline W&B runs read back by our own decoder of the .wandb file (tests/wandb_offline.py):
what train/train.py logged equals what it wrote to metrics.json and what the report draws;
broken run folders give clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

try:
    from tests.wandb_offline import WandbRunError, find_runs, read_run
except ImportError:  # tests/ is not a package
    from wandb_offline import WandbRunError, find_runs, read_run

ROOT = Path(__file__).resolve().parent.parent
NAMESPACES = ("train/", "eval/", "snn/", "cl/", "plots/", "final/")
SECRETS = {"HF_TOKEN": "hf_FAKEsecretTOKEN4test", "WANDB_API_KEY": "wandbFAKEkey0123456789"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real train/train.py run (both heads, W&B offline) on a tiny random BERT encoder
    with MiniLM's tokenizer and two small built-in domains: about 30 s."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hybridlm.trunks import resolve_trunk

    tmp = tmp_path_factory.mktemp("wandb-run")
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=128))
    enc.save_pretrained(tmp / "enc")
    AutoTokenizer.from_pretrained(resolve_trunk("minilm").path).save_pretrained(tmp / "enc")
    out = tmp / "run"
    args = [sys.executable, "train/train.py", "--config", "configs/quick.yaml",
            f"output_dir={out}", f"model.encoder={tmp / 'enc'}",
            f"data.cache_dir={ROOT / '.cache' / 'hybridlm'}",
            "data.domains=[{name: legal, source: 'builtin:licenses'}, "
            "{name: docs, source: 'builtin:python_reference'}]",
            "data.max_train_tokens_per_domain=2048", "data.max_eval_tokens_per_domain=512",
            "model.n_neurons=16", "train.epochs=1", "train.eval_every=2", "wandb.enabled=true"]
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"} | SECRETS
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def runs_by_name(run_dir):
    runs = [read_run(f) for f in find_runs(run_dir)]
    return {r.name: r for r in runs}


def test_no_secret_reaches_any_file_of_the_run(run_dir):
    """The run had a Hub token and a W&B key in its environment: no log, config, manifest,
    card or W&B file holds them."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(v.encode() in data for v in SECRETS.values()), path


def test_one_finished_run_per_head_in_the_experiment_group(run_dir):
    runs = runs_by_name(run_dir)
    assert set(runs) == {"spiking_pc", "mlp"}
    for r in runs.values():
        assert r.finished and r.exit_code == 0
        assert r.group == run_dir.name and r.project == "hybridlm"


def test_logged_history_equals_metrics_json(run_dir):
    for head, run in runs_by_name(run_dir).items():
        metrics = json.loads((run_dir / head / "metrics.json").read_text())
        assert metrics["history"]
        for row in metrics["history"]:
            logged = run.row(row["step"])
            for key, value in row.items():
                if key != "step":
                    assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), (head, key)
        # every metric W&B has is namespaced
        keys = {k for r in run.history for k in r if not k.startswith("_")}
        assert keys and all(k.startswith(NAMESPACES) for k in keys), keys
        # the final evaluation is in the summary
        for split in ("validation", "test"):
            for d, r in metrics[split].items():
                assert run.summary[f"final/{split}/{d}/perplexity"] == pytest.approx(
                    r["perplexity"], rel=1e-12)


def test_report_curves_are_what_wandb_logged(run_dir):
    """The report reads the run's own files (history.jsonl, else metrics.json), not W&B's:
    every row its training curves use is what W&B logged at that step."""
    from hybridlm.report import load_run, training_history

    run = load_run(run_dir)
    for head, logged in runs_by_name(run_dir).items():
        rows = training_history(run, head)
        assert rows, head
        for row in rows:
            at = logged.row(row["step"])
            for key, value in row.items():
                if key != "step":
                    assert at[key] == pytest.approx(value, rel=1e-12, abs=0), (head, key)


def test_run_config_is_the_run_config_file(run_dir):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for run in runs_by_name(run_dir).values():
        for section in ("data", "model", "train", "wandb", "seed"):
            assert run.config[section] == cfg[section]


def test_records_spanning_blocks_and_media(tmp_path):
    """A config bigger than a 32 KiB block (FIRST/MIDDLE/LAST chunks) and an image."""
    import numpy as np
    import wandb

    big = {f"k{i}": "x" * 100 for i in range(800)}  # about 90 KiB
    run = wandb.init(project="p", name="n", mode="offline", dir=str(tmp_path), config=big,
                     reinit="create_new")
    run.log({"train/loss": 0.5}, step=1)
    run.log({"plots/x": wandb.Image(np.zeros((4, 4, 3), dtype=np.uint8))}, step=2)
    run.finish()
    wandb.teardown()
    back = read_run(tmp_path)
    assert back.config == big
    assert back.row(1)["train/loss"] == 0.5
    image = back.row(2)["plots/x"]
    assert image["_type"] == "image-file"
    assert (back.path.parent / "files" / image["path"]).is_file()


def test_incomplete_or_corrupt_runs_are_named(run_dir, tmp_path):
    src = find_runs(run_dir)[0]
    data = src.read_bytes()
    with pytest.raises(WandbRunError, match="incomplete W&B run directory"):
        read_run(tmp_path)  # an empty folder
    cut = tmp_path / "cut" / "run-x.wandb"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WandbRunError, match=r"run-x\.wandb: (truncated|incomplete)"):
        read_run(cut)
    flipped = bytearray(data)
    flipped[200] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(WandbRunError, match=r"run-bad\.wandb: checksum mismatch"):
        read_run(bad)
    (tmp_path / "notwandb.wandb").write_bytes(b"hello world")
    with pytest.raises(WandbRunError, match="not a W&B run file"):
        read_run(tmp_path / "notwandb.wandb")
