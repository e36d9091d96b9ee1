"""Local HTML report from a run folder's metrics.json (and history.jsonl) files."""

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from hybridlm import report
from tests.conftest import command

ROOT = Path(__file__).resolve().parent.parent


def write_run(root: Path) -> Path:
    """A run folder in train.py's format (two heads, two domains)."""
    run = root / "demo"
    cfg = {"output_dir": str(run), "seed": 0, "train": {"heads": ["spiking_pc", "mlp"]},
           "wandb": {"project": "hybridlm"}}
    summary = {"heads": {}, "data": {"legal": {"documents": 10, "train_tokens": 4096},
                                     "docs": {"documents": 12, "train_tokens": 5120}},
               "spiking_pc_vs_mlp": {}}
    for i, head in enumerate(("spiking_pc", "mlp")):
        hist = [{"step": 0, "eval/legal/perplexity": 900.0, "eval/docs/perplexity": 950.0}]
        hist += [{"step": s, "train/loss": 6.0 - s / 10 - i / 10, "train/lr": 1e-3}
                 | ({"snn/firing_rate": 0.1 + s / 1000} if head == "spiking_pc" else {})
                 for s in range(10, 60, 10)]
        hist += [{"step": 50, "eval/legal/perplexity": 60.5 + i, "eval/docs/perplexity": 70.25}]
        res = {d: {"perplexity": p + i, "accuracy": 0.2, "tokens": 512}
               | ({"firing_rate": 0.1234} if head == "spiking_pc" else {})
               for d, p in (("legal", 60.5), ("docs", 70.25))}
        m = {"head": head, "trainable_parameters": 1000 + i, "head_parameters": 100,
             "optimizer_steps": 50, "skipped_steps": 0, "epoch_seconds": [1.5],
             "validation": res, "test": res, "history": hist}
        (run / head).mkdir(parents=True)
        (run / head / "metrics.json").write_text(json.dumps(m))
        summary["heads"][head] = m
    for d in ("legal", "docs"):
        s, b = summary["heads"]["spiking_pc"], summary["heads"]["mlp"]
        a, c = s["validation"][d]["perplexity"], b["validation"][d]["perplexity"]
        summary["spiking_pc_vs_mlp"][d] = {"spiking_pc": a, "mlp": c, "relative_change": a / c - 1}
    (run / "metrics.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_local_html_report_is_self_contained_with_tables_and_plots(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    run = write_run(tmp_path)
    assert command("eval/report.py").main([str(run)]) == 0  # the command, in this process
    out = capsys.readouterr().out
    assert "made a local HTML report" in out and "no W&B API key" in out
    page = (run / "report.html").read_text()
    assert "60.5000" not in page and "60.50" in page  # val perplexity of legal, spiking_pc
    assert "spiking_pc" in page and "mlp" in page and "firing rate" in page
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing to fetch
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4  # loss, eval perplexity, per-domain bars, firing rate
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)


def test_offline_mode_never_tries_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    kind, where, why = report.build_report(write_run(tmp_path), tmp_path / "r.html")
    assert kind == "html" and why == "WANDB_MODE=offline" and Path(where).is_file()
    with pytest.raises(report.ReportError, match="cannot make a W&B Report"):
        report.build_report(tmp_path / "demo", kind="wandb")


def every_step(head: str) -> list[dict]:
    """What a head's history.jsonl holds: every logged row, not only every 10th step."""
    return [{"step": s, "train/loss": 6.0 - s / 100, "train/lr": 1e-3}
            | ({"snn/firing_rate": 0.2 - s / 1000} if head == "spiking_pc" else {})
            for s in range(1, 51)]


def write_history(run: Path, head: str, rows: list[dict], extra: str = "") -> None:
    (run / head / "history.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + extra)


def test_curves_come_from_history_jsonl_else_metrics_json(tmp_path):
    run = write_run(tmp_path)
    plain = report.load_run(run)
    assert not plain.history
    for head, m in plain.heads.items():
        assert report.training_history(plain, head) == m["history"]
    assert "history.jsonl" not in report.html_report(plain)
    before = report.figures(plain)

    # history.jsonl holding metrics.json's rows: the same figures, byte for byte
    for head, m in plain.heads.items():
        write_history(run, head, m["history"], extra="\n")  # a blank line is skipped
    assert report.figures(report.load_run(run)) == before

    # every logged step in history.jsonl (one head): it is preferred for the training curves;
    # the validation curves and the per-domain bars still come from metrics.json
    write_history(run, "spiking_pc", every_step("spiking_pc"))
    (run / "mlp" / "history.jsonl").unlink()
    dense = report.load_run(run)
    assert dense.history == {"spiking_pc": every_step("spiking_pc")}
    assert report.training_history(dense, "spiking_pc") == every_step("spiking_pc")
    assert report.training_history(dense, "mlp") == dense.heads["mlp"]["history"]
    assert "every logged step, from &lt;head&gt;/history.jsonl" in report.html_report(dense)
    after = report.figures(dense)
    assert after.keys() == before.keys()
    for key in ("eval_perplexity", "domain_perplexity"):
        assert after[key] == before[key]
    for key in ("train_loss", "firing_rate"):
        assert after[key] != before[key]


def test_unreadable_history_jsonl_falls_back_to_metrics_json(tmp_path):
    run = write_run(tmp_path)
    write_history(run, "spiking_pc", every_step("spiking_pc"), extra='{"step": 51, "train/lo')
    (run / "mlp" / "history.jsonl").write_bytes(b"\xff\xfe not text")
    loaded = report.load_run(run)
    assert not loaded.history
    assert report.training_history(loaded, "spiking_pc") == loaded.heads["spiking_pc"]["history"]


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no <head>/metrics.json"):
        report.load_run(tmp_path / "empty")
    assert command("eval/report.py").main([str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize("file, damage, message", [
    ("metrics.json", "truncate", "metrics.json: not valid JSON"),
    ("metrics.json", "delete", "metrics.json: missing"),
    ("metrics.json", "[1, 2]", "metrics.json: not a JSON object"),
    ("mlp/metrics.json", "truncate", "mlp/metrics.json: not valid JSON"),
    ("mlp/metrics.json", "null", "mlp/metrics.json: not a JSON object"),
    ("mlp", "delete", "mlp/metrics.json: missing"),
    ("config.yaml", "train: [", "config.yaml: not valid YAML"),
    ("config.yaml", "delete", "config.yaml: missing"),
    ("config.yaml", "just a string", "config.yaml: not a mapping"),
])
def test_incomplete_or_corrupt_run_is_an_error_line(tmp_path, capsys, file, damage, message):
    run = write_run(tmp_path)
    f = run / file
    if damage == "delete":
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.write_text(damage)
    assert command("eval/report.py").main([str(run), "--kind", "html"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / file.split('/')[0]}") and message in err
    assert "--resume" in err or "rerun" in err  # what to do
    assert not (run / "report.html").exists()
