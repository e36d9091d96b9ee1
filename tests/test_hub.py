"""Model folders: fresh-process loading, remote code without hybridlm, the model card, the
folder validator, and publishing through huggingface_hub to a loopback fake Hub."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, BertConfig

from hybridlm import hub
from hybridlm.modeling import HybridConfig, HybridForCausalLM
from hybridlm.trunks import resolve_trunk
from tests.conftest import command
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("literature", "docs")
PROMPT = "the king said that"


def fake_metrics(head: str = "spiking_pc") -> dict:
    """A head's metrics.json in train.py's format, with made-up but plausible numbers."""
    def split(base):
        return {d: {"loss": 3.0 + i, "perplexity": base + 10 * i, "accuracy": 0.25 - i / 100,
                    "tokens": 2048, "firing_rate": 0.125 + i / 100} for i, d in enumerate(DOMAINS)}
    hist = [{"step": 0, "eval/literature/perplexity": 900.0, "eval/docs/perplexity": 950.0},
            {"step": 10, "train/loss": 4.5, "train/lr": 1e-3, "snn/firing_rate": 0.1875}]
    return {"head": head, "trainable_parameters": 12345, "head_parameters": 1234,
            "optimizer_steps": 20, "skipped_steps": 0, "train_tokens_per_epoch": 8192,
            "epoch_seconds": [3.5, 2.5], "validation": split(40.5), "test": split(42.25),
            "history": hist}


CFG = {"output_dir": "runs/x", "seed": 0,
       "data": {"domains": [{"name": "literature", "source": "builtin:shakespeare"},
                            {"name": "docs", "source": "hf:acme/python-docs"}]},
       "model": {"encoder": "minilm", "n_neurons": 16}, "train": {"lr": 0.003}}


def make_model() -> HybridForCausalLM:
    """A small random model with MiniLM's vocabulary, so the real tokenizer fits."""
    torch.manual_seed(0)
    enc = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64).to_dict()
    enc["_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    cfg = HybridConfig(encoder_config=enc, n_neurons=16, time_steps=4, threshold=0.7)
    return HybridForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, input ids, reference logits) of a saved model with tokenizer and card."""
    folder = tmp_path_factory.mktemp("model") / "model"
    model = make_model()
    tok = AutoTokenizer.from_pretrained(resolve_trunk("minilm").path)
    hub.save_model(model, folder, tok, metrics=fake_metrics(), summary={"processes": 1},
                   cfg=CFG)
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, folder.parent / "ref.pt")
    return folder


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


CHILD = r"""
import sys, torch
ref = torch.load(sys.argv[2])
{prelude}
from transformers import AutoModelForCausalLM, pipeline
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]{kw}).eval()
with torch.no_grad():
    diff = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
out = model.generate(ref["ids"], max_new_tokens=4, do_sample=False)
gen = pipeline("text-generation", model=sys.argv[1], {pkw}max_new_tokens=4, do_sample=False)
text = gen("{prompt}")[0]["generated_text"]
shape = "x".join(map(str, out.shape))
print("RESULT", diff, shape, text.startswith("{prompt}"), "hybridlm" in sys.modules)
"""

# hybridlm is installed in editable mode (a meta-path finder): drop it and any sys.path entry
# that holds the package, so `import hybridlm` fails in the child.
NO_HYBRIDLM = r"""
import os
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "hybridlm"))]
try:
    import hybridlm
    raise SystemExit("hybridlm is importable")
except ImportError:
    pass
"""


def run_child(tmp_path, folder, prelude, kw="", pkw="", isolated=False):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(prelude=prelude, kw=kw, pkw=pkw, prompt=PROMPT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    cmd = [sys.executable] + (["-I"] if isolated else []) + [str(script), str(folder),
                                                           str(folder.parent / "ref.pt")]
    proc = subprocess.run(cmd, cwd=tmp_path if isolated else ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return line.split()[1:]


def test_saved_folder_is_complete_and_needs_no_remote_code(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert not any(n.endswith(".py") for n in names)
    assert "auto_map" not in json.loads((saved / "config.json").read_text())
    assert hub.check_model_folder(saved, require_card=True)["model_type"] == "hybridlm"


def test_fresh_process_loads_same_logits_generates_and_pipelines(saved, tmp_path):
    diff, shape, prefix, _ = run_child(tmp_path, saved, "import hybridlm")
    assert float(diff) == 0.0
    assert prefix == "True" and shape == f"1x{4 + len(PROMPT.split())}"


def test_remote_code_export_loads_without_hybridlm(saved, tmp_path):
    folder = copy(saved, tmp_path)
    shutil.copy(saved.parent / "ref.pt", tmp_path / "ref.pt")
    hub.export_remote_code(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == hub.AUTO_MAP
    src = (folder / hub.REMOTE_CODE).read_text()
    assert "import hybridlm" not in src.replace("from hybridlm", "")  # only inside _SOURCES
    hub.check_model_folder(folder)
    diff, _, prefix, imported = run_child(tmp_path, folder, NO_HYBRIDLM,
                                          kw=", trust_remote_code=True",
                                          pkw="trust_remote_code=True, ", isolated=True)
    assert imported == "False"
    assert float(diff) <= 1e-5  # plain-torch reference vs the default kernels
    assert prefix == "True"


def test_model_card_is_read_back_with_measured_results(saved):
    card = ModelCard.load(saved / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["pipeline_tag"] == "text-generation"
    assert {"spiking-neural-network", "predictive-coding"} <= set(data["tags"])
    assert data["datasets"] == ["acme/python-docs"]
    results = {(r.dataset_name.split(" ")[0], r.dataset_split): r.metric_value
               for r in card.data.eval_results}
    m = fake_metrics()
    for split in ("validation", "test"):
        for d in DOMAINS:
            assert results[(d, split)] == pytest.approx(m[split][d]["perplexity"])
    text = card.text
    assert "0.1250" in text and "0.1350" in text  # firing rates of the two domains
    assert "## Training configuration" in text and "lr: 0.003" in text
    assert "## Intended use" in text and "## Limitations" in text
    assert "12,345" in text  # trainable parameters


def truncate(f: Path):
    f.write_bytes(f.read_bytes()[:-100])


def garbage(f: Path):
    f.write_bytes(b"\x00" * 64)


def edit_config(**fields):
    def fn(f: Path):
        cfg = json.loads(f.read_text())
        for k, v in fields.items():
            if k.startswith("encoder_config."):
                cfg["encoder_config"][k.split(".", 1)[1]] = v
            else:
                cfg[k] = v
        f.write_text(json.dumps(cfg))
    return fn


@pytest.mark.parametrize("file, damage, message", [
    ("model.safetensors", Path.unlink, "model.safetensors: missing"),
    ("model.safetensors", truncate, "model.safetensors: truncated or corrupt"),
    ("model.safetensors", garbage, "model.safetensors: corrupt"),
    ("config.json", Path.unlink, "config.json: missing"),
    ("config.json", lambda f: f.write_text("{not json"), "config.json: not valid JSON"),
    ("config.json", edit_config(model_type="bert"), "field 'model_type' is 'bert'"),
    ("config.json", edit_config(**{"encoder_config.vocab_size": 30000}),
     "tensor 'encoder.embeddings.word_embeddings.weight' has shape [30522, 32]"),
    ("config.json", edit_config(auto_map=hub.AUTO_MAP), "modeling_hybridlm.py, which is missing"),
    ("tokenizer.json", lambda f: f.write_text(json.dumps(
        {"model": {"vocab": {"a": 0, "b": 40000}}, "added_tokens": []})),
     "tokenizer.json: the tokenizer has ids up to 40000, but the embeddings have 30522"),
    ("README.md", Path.unlink, "README.md: missing model card"),
])
def test_bad_folders_name_the_file_or_field(saved, tmp_path, file, damage, message):
    folder = copy(saved, tmp_path)
    damage(folder / file)
    with pytest.raises(hub.CheckpointError) as e:
        hub.check_model_folder(folder, require_card=True)
    assert message in str(e.value)
    if file == "model.safetensors" or file == "config.json":
        with pytest.raises(hub.CheckpointError):
            hub.load_model(folder)


def publish_cli(folder, repo, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "train/publish.py", str(folder), repo], cwd=ROOT,
                          env=base | env, capture_output=True, text=True, timeout=300)


def test_publish_uploads_one_commit_with_our_card(saved, tmp_path):
    with FakeHub() as fake:
        env = {"HF_ENDPOINT": fake.url, "HF_TOKEN": "hf_fake_token", "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home")}
        proc = publish_cli(saved, "someone/tiny-hybrid", env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "published" in proc.stdout and fake.url in proc.stdout
        assert len(fake.commits) == 1
        commit = fake.commits[0]
        assert commit["repo"] == "someone/tiny-hybrid" and commit["token"] == "hf_fake_token"
        local = {p.name: p.read_bytes() for p in saved.iterdir()}
        assert commit["files"] == local  # every file, byte for byte, in that one commit
        card = ModelCard(commit["files"]["README.md"].decode())
        assert card.data.license == "apache-2.0"


def test_publish_without_token_fails_clearly_and_sends_nothing(saved, tmp_path):
    with FakeHub() as fake:
        env = {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "empty-hf-home")}
        proc = publish_cli(saved, "someone/tiny-hybrid", env)
        assert proc.returncode == 2
        assert "no Hugging Face token" in proc.stderr and "Traceback" not in proc.stderr
        assert fake.requests == []


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "user/bad name", "user/x..y", "/name",
                                  "user/" + "x" * 97, "user/name--x", "user/name\n",
                                  "user/name ", " user/name", "user/na\tme", "user/name\x00"])
def test_malformed_repo_id_is_refused(saved, repo):
    with pytest.raises(hub.PublishError, match="malformed Hub repo id"):
        hub.publish(saved, repo, token="hf_x", endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "README.md"])
def test_publish_refuses_incomplete_folder(saved, tmp_path, missing):
    folder = copy(saved, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(hub.PublishError, match=f"refusing to publish: .*{missing}"):
        hub.publish(folder, "someone/x", token="hf_x", endpoint="http://127.0.0.1:9")


def test_continual_results_join_the_card_and_its_model_index(saved, tmp_path):
    """eval/continual.py's card summary: the method that trained a head like this one (same
    head, learning mode and gate) goes into the card text and the model-index."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir / "spiking_pc" / "model")
    (run_dir / "spiking_pc" / "metrics.json").write_text(json.dumps(fake_metrics()))
    ms = lambda m: {"mean": m, "std": 0.01, "n": 3}  # noqa: E731
    summary = {"order": ["literature", "docs"], "trunk": "minilm", "split": "test",
               "tokens_per_stage": 8192, "verdict": ["- The claim does not hold here."],
               "methods": {
                   "finetune": {"head": "mlp", "learning": "bptt", "gate": "surprise",
                                "joint": False, "seeds": [0, 1, 2], "ACC": ms(1.5),
                                "forgetting": ms(0.04)},
                   "spiking_hybrid": {"head": "spiking_pc", "learning": "hybrid",
                                      "gate": "energy", "joint": False, "seeds": [0, 1, 2],
                                      "ACC": ms(1.6), "forgetting": ms(0.02)},
                   "spiking_bptt": {"head": "spiking_pc", "learning": "bptt",
                                    "gate": "surprise", "joint": False, "seeds": [0, 1, 2],
                                    "ACC": ms(1.55), "forgetting": ms(0.03)}}}
    assert hub.add_continual_to_cards(tmp_path / "empty", summary) == []
    assert hub.add_continual_to_cards(run_dir, summary) == [run_dir / "spiking_pc" / "model"]
    assert json.loads((run_dir / "continual_summary.json").read_text()) == summary
    card = ModelCard.load(run_dir / "spiking_pc" / "model" / "README.md")
    cont = {r.metric_type: r.metric_value for r in card.data.eval_results
            if r.dataset_type == "continual"}
    # the saved model learns by BPTT with the surprise gate: spiking_bptt is its method
    assert cont["continual_forgetting_bits_per_character"] == pytest.approx(0.03)
    assert cont["continual_acc_bits_per_character"] == pytest.approx(1.55)
    assert "## Continual learning" in card.text and "spiking_bptt (this head)" in card.text
    assert "The claim does not hold here." in card.text and "| finetune |" in card.text
    # a later card rewrite (e.g. before publishing) keeps the section
    hub.write_card_for_run(run_dir, "spiking_pc")
    assert "## Continual learning" in ModelCard.load(run_dir / "spiking_pc" / "model" /
                                                     "README.md").text


# ---- publishing: only the model's own files, one commit, nothing changed when refused ----------
TOKEN = "hf_" + "FakeSecret" * 3


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The loopback fake Hub for publishing in this process: online, its endpoint, a token in
    HF_TOKEN and no stored login."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def publish_here(*argv) -> int:
    return command("train/publish.py").main([str(a) for a in argv])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


EXTRAS = {"token": b"hf_leaked", "id_rsa": b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
          "secrets/hub.txt": b"hf_leaked", "wandb/debug-internal.log": b"log line\n",
          "debug.log": b"log line\n", "stray.bin": bytes(1 << 20), "notes.py": b"x = 1\n",
          ".env": b"HF_TOKEN=hf_leaked\n"}


def test_publish_uploads_only_the_model_files_in_one_commit(saved, tmp_path, fake_hub,
                                                            monkeypatch, capsys):
    folder = copy(saved, tmp_path)
    for name, data in EXTRAS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    # the client splits a folder upload into commits of 100 MB of content: with a small
    # budget, an upload of a few MB would take several
    monkeypatch.setattr("huggingface_hub._upload_pipeline.REGULAR_CONTENT_BYTES_BUDGET", 4096)
    assert publish_here(folder, "someone/tiny-hybrid") == 0
    out = capsys.readouterr().out
    assert len(fake_hub.commits) == 1
    assert fake_hub.commits[0]["files"] == snapshot(saved)  # the model's files, nothing else
    for name in EXTRAS:  # each extra is named as left out, before the upload
        assert name.split("/")[0] in out.split("\npublished ")[0]


@pytest.mark.parametrize("link", ["tokenizer.json", "extra_link", "ssh"])
def test_publish_refuses_links_out_of_the_folder(saved, tmp_path, fake_hub, capsys, link):
    folder = copy(saved, tmp_path)
    outside = tmp_path / "outside"
    if link == "ssh":
        outside.mkdir()
        (outside / "id_rsa").write_text("private key")
    elif link == "tokenizer.json":
        (folder / link).rename(outside)
    else:
        outside.write_text("hf_leaked")
    (folder / link).symlink_to(outside)
    assert publish_here(folder, "someone/x") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{folder / link}" in err and "outside" in err
    assert fake_hub.requests == []


def test_token_on_the_command_line_is_never_printed(saved, tmp_path, fake_hub, capsys):
    secret = "hf_" + "CommandLineSecret" * 2
    bad = copy(saved, tmp_path)
    (bad / "README.md").unlink()
    assert publish_here(bad, "someone/x", "--token", secret) == 2
    assert publish_here(saved, "someone/x", "--token", secret) == 0
    assert fake_hub.commits[0]["token"] == secret
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    # make prints its recipe lines: the publish recipe must not print the token (PY=true
    # stands in for Python; -o: nothing is installed)
    proc = subprocess.run(["make", "-o", ".venv/.installed", "-o", "install", "publish",
                           "PY=true", f"FOLDER={saved}", "HUB_REPO=someone/x",
                           f"ARGS=--private --token {secret}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr and "--private" in proc.stdout


def write_run(tmp_path: Path, folder: Path, **model) -> Path:
    """A run folder in train.py's layout whose spiking_pc head is the model in `folder`;
    `model` changes keys of its config's model section."""
    from hybridlm.modeling import MODEL_KEYS

    run = tmp_path / "run"
    shutil.copytree(folder, run / "spiking_pc" / "model")
    (run / "spiking_pc" / "metrics.json").write_text(json.dumps(fake_metrics()))
    config = json.loads((folder / "config.json").read_text())
    section = {"encoder": "minilm"} | {k: config[k] for k in MODEL_KEYS} | model
    cfg = CFG | {"model": section, "train": {"heads": ["spiking_pc"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def test_refused_publish_changes_nothing_and_a_published_one_matches_the_folder(
        saved, tmp_path, fake_hub, monkeypatch, capsys):
    folder = copy(saved, tmp_path)
    run = write_run(tmp_path, folder)
    before = snapshot(folder)
    monkeypatch.delenv("HF_TOKEN")
    assert publish_here(folder, "someone/tiny", "--remote-code", "--card-from", run) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert snapshot(folder) == before  # no remote code, no new card
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish_here(folder, "someone/tiny", "--remote-code", "--card-from", run) == 0
    files = fake_hub.commits[0]["files"]
    assert hub.REMOTE_CODE in files and "auto_map" in json.loads(files["config.json"])
    assert "# tiny" in files["README.md"].decode()  # the card named after the repo
    assert files == snapshot(folder)  # the folder now holds what was published


@pytest.mark.parametrize("change, message", [
    ("n_neurons", "model.n_neurons"),
    ("weights", "model.safetensors"),
    ("head", "spiking_pc/metrics.json: missing"),
])
def test_card_from_another_run_is_refused(saved, tmp_path, fake_hub, capsys, change, message):
    folder = copy(saved, tmp_path)
    run = write_run(tmp_path, folder, **({"n_neurons": 32} if change == "n_neurons" else {}))
    if change == "weights":  # another seed: the same config, other weights
        w = run / "spiking_pc" / "model" / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
    if change == "head":
        shutil.move(run / "spiking_pc", run / "mlp")
    before = snapshot(folder)
    assert publish_here(folder, "someone/x", "--card-from", run) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert snapshot(folder) == before and fake_hub.requests == []


# ---- make eval ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "no tokenizer", "not a folder"])
def test_eval_on_a_broken_folder_is_an_error_line(saved, tmp_path, capsys, damage):
    folder = copy(saved, tmp_path)
    if damage == "truncate":
        truncate(folder / "model.safetensors")
    elif damage == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        folder = tmp_path / "nothing"
    rc = command("eval/evaluate.py").main(["--config", "configs/quick.yaml", "--model",
                                           str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and str(folder) in err


def test_eval_results_of_sibling_folders_do_not_overwrite_each_other(saved, tmp_path, capsys):
    text = tmp_path / "foxes.txt"
    text.write_text("\n\n".join(f"Paragraph {j}: the quick brown fox jumps over the lazy dog."
                                  for j in range(60)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"domains": [{"name": "foxes", "source": f"files:{text}"}], "block_size": 32,
                 "passage_chars": 400,  # 3 passages or more
                 "cache_dir": str(ROOT / ".cache" / "hybridlm")},  # content-keyed: reused
        "model": {"encoder": "minilm"}}))
    evaluate = command("eval/evaluate.py")
    shutil.copytree(saved, tmp_path / "a")
    rc = evaluate.main(["--config", str(config), "--model", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "a.eval.json").read_text())  # named after its folder
    assert results["model"] == str(tmp_path / "a") and results["validation"]["foxes"]
    assert not (tmp_path / "eval.json").exists()
    assert evaluate.eval_json(tmp_path / "b") == tmp_path / "b.eval.json"  # its sibling's
