"""The continual-learning runner on a tiny model and synthetic domains; config errors; one
short real run (slow)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator

from hybridlm.config import ConfigError, ContinualConfig, MethodConfig, TrainConfig, load_config
from hybridlm.continual import (
    EWC,
    Reservoir,
    Stream,
    TaggedBlocks,
    check_checkpoint_tokenizer,
    evaluate_row,
    method_model_config,
    run_sequence,
)
from hybridlm.corpora import DataError
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16


def synthetic(lo: int, hi: int, n_blocks: int, seed: int) -> datasets.Dataset:
    """A domain whose tokens are drawn from [lo, hi): domains differ in their vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n_blocks, BLOCK), generator=g)
    mask = torch.ones_like(ids, dtype=torch.int8)
    mask[-1, BLOCK // 2:] = 0  # a padded last block, as data.pack writes it
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


RANGES = {"a": (5, 40), "b": (40, 80), "c": (80, 119)}


def make_stream(order=("a", "b", "c"), tokens_per_stage=4 * BLOCK, cache=True) -> Stream:
    train = {d: synthetic(*r, 12, i) for i, (d, r) in enumerate(RANGES.items())}
    test = {d: synthetic(*r, 4, 100 + i) for i, (d, r) in enumerate(RANGES.items())}
    return Stream.build(list(order), train, test, tokens_per_stage, cache=cache)


CC = ContinualConfig(seeds=[0], tokens_per_stage=4 * BLOCK, replay_fraction=0.5,
                     fisher_batches=2, eval_time_steps=[1, 2])
TC = TrainConfig(batch_size=2, lr=0.01, warmup_fraction=0.0)


def run(method: MethodConfig, head="mlp", stream=None, diagnostics=False, **model_kw):
    torch.manual_seed(0)
    model = tiny_model(head, **model_kw).train()
    return run_sequence(model, method, stream or make_stream(), CC, TC, seed=0,
                        accelerator=Accelerator(cpu=True), diagnostics=diagnostics)


def test_every_method_fills_the_matrices_with_equal_tokens():
    results = {
        "finetune": run(MethodConfig("finetune", "mlp")),
        "gated": run(MethodConfig("gated", "spiking_pc"), "spiking_pc", diagnostics=True,
                     learning="hybrid", gate="surprise"),
        "ewc": run(MethodConfig("ewc", "mlp", ewc_lambda=10.0)),
        "replay": run(MethodConfig("replay", "mlp", replay_size=6)),
    }
    slots = {n: [s["token_slots"] for s in r["stages"]] for n, r in results.items()}
    assert len({str(t) for t in slots.values()}) == 1, slots  # equal tokens per stage
    assert slots["finetune"] == [4 * BLOCK] * 3
    for r in results.values():  # padding (the last block of a split) is not a token
        assert all(4 * BLOCK - BLOCK // 2 <= s["tokens"] <= 4 * BLOCK for s in r["stages"])
    for r in results.values():
        for k in ("loss", "perplexity", "accuracy"):
            R = r["R"][k]
            assert len(R) == 3 and all(len(row) == 3 for row in R)
            assert len(r["baseline"][k]) == 3
            assert r["metrics"][k]["BWT"] is not None
        assert r["stages"][0]["train_loss"] is not None
    ft = results["finetune"]
    # training on a domain lowers its own test loss below the untrained model's
    for j in range(3):
        assert ft["R"]["loss"][j][j] < ft["baseline"]["loss"][j]
    assert results["replay"]["stages"][0]["replayed_per_batch"] == 0  # empty buffer at first
    assert results["replay"]["stages"][1]["replayed_per_batch"] == 1
    assert results["ewc"]["R"] != ft["R"]  # the penalty changes training
    g = results["gated"]
    assert len(g["firing_rate"]) == 4  # untrained row + one per stage
    assert g["stages"][0]["gate_mean"] is not None
    diag = g["diagnostics"]["by_T"]
    assert sorted(diag, key=int) == ["1", "2", "4"]  # the sweep plus the trained T
    assert len(diag["4"]["a"]["energy_per_step"]) == 4
    assert len(diag["2"]["b"]["rate_per_step"]) == 2
    # the sweep restores the trained T, and at that T it matches the last R row
    assert diag["4"]["c"]["loss"] == pytest.approx(g["R"]["loss"][-1][2], rel=1e-5)


def test_same_checkpoint_evaluated_twice_gives_the_same_numbers():
    stream = make_stream()
    acc = Accelerator(cpu=True)
    for head in ("mlp", "spiking_pc"):
        model = tiny_model(head)
        first = evaluate_row(model, stream, acc, 3)  # fills the feature cache
        second = evaluate_row(model, stream, acc, 3)  # served from it
        assert first == second
        fresh = evaluate_row(model, make_stream(cache=False), acc, 3)  # no cache at all
        for d in first:
            assert fresh[d]["loss"] == pytest.approx(first[d]["loss"], rel=1e-6)
    assert stream.test_caches["a"].hits > 0


def test_evaluation_refuses_non_test_splits():
    stream = make_stream()
    stream.test["b"] = stream.train["b"]  # a train split where a test split belongs
    with pytest.raises(AssertionError, match="TEST splits.*'train' of domain 'b'"):
        evaluate_row(tiny_model("mlp"), stream, Accelerator(cpu=True), 4)


def test_single_domain_sequence_metrics_not_defined():
    r = run(MethodConfig("finetune", "mlp"), stream=make_stream(order=("a",)))
    m = r["metrics"]["loss"]
    assert m["ACC"] is not None
    assert m["BWT"] is None and m["FWT"] is None and m["forgetting"] is None
    sys.path.insert(0, str(ROOT / "eval"))
    import continual as script  # eval/continual.py

    agg = script.aggregate({"finetune": [r]})
    assert agg["finetune"]["metrics"]["loss"]["BWT"]["mean"] is None
    assert "not defined" in " ".join(script.verdict(agg, ["a"]))
    assert script.pm(agg["finetune"]["metrics"]["loss"]["forgetting"]) == "not defined"


def test_stream_errors_name_the_key():
    train = {"a": synthetic(5, 40, 4, 0)}
    test = {"a": synthetic(5, 40, 2, 1)}
    with pytest.raises(ConfigError, match=r"continual.order\[1\].*'zz'"):
        Stream.build(["a", "zz"], train, test, BLOCK)
    empty = datasets.Dataset.from_dict({"input_ids": [[0] * BLOCK],
                                        "attention_mask": [[0] * BLOCK]})
    with pytest.raises(DataError, match=r"continual.order\[0\].*no training data"):
        Stream.build(["a"], {"a": empty}, test, BLOCK)
    with pytest.raises(ConfigError, match="continual.tokens_per_stage"):
        Stream.build(["a"], train, test, 10 * BLOCK)
    with pytest.raises(ConfigError, match="continual.order"):
        Stream.build([], train, test, BLOCK)


@pytest.mark.parametrize("override, key", [
    ("continual.order=[literature, nowhere]", r"continual.order\[1\]"),
    ("continual.order=[docs, docs]", "continual.order"),
    ("continual.tokens_per_stage=8", "continual.tokens_per_stage"),
    ("continual.seeds=[]", "continual.seeds"),
    ("continual.replay_fraction=1.0", "continual.replay_fraction"),
    ("continual.energy_preset=fp8", "continual.energy_preset"),
    ("continual.methods=[{name: x, head: rnn}]", r"continual.methods\[0\].head"),
    ("continual.methods=[{name: x, ewc_lambda: -1}]", r"continual.methods\[0\].ewc_lambda"),
    ("continual.methods=[{name: x, modle: []}]", r"continual.methods\[0\].modle"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/continual_quick.yaml", [override])


@pytest.mark.parametrize("model, match", [
    ("[learning=sgd]", "model.learning"),
    ("[n_neuron=3]", "unknown model key 'n_neuron'"),
    ("[encoder=bert]", "cannot differ between methods"),
    ("[time_steps=abc]", "time_steps"),
])
def test_method_overrides_are_checked(model, match):
    cfg = load_config("configs/continual_quick.yaml",
                      [f"continual.methods=[{{name: x, head: spiking_pc, model: {model}}}]"])
    with pytest.raises(ConfigError, match=r"continual.methods\[0\].model") as e:
        method_model_config(cfg, 0)
    assert match in str(e.value)


def test_shipped_methods_are_matched_configs():
    for path in ("configs/continual.yaml", "configs/continual_quick.yaml"):
        cfg = load_config(path)
        names = [m.name for m in cfg.continual.methods]
        assert names == ["finetune", "spiking_bptt", "spiking_hebbian", "spiking_hebbian_gated",
                         "ewc", "replay"]
        models = {m.name: method_model_config(cfg, i)
                  for i, m in enumerate(cfg.continual.methods)}
        assert models["spiking_hebbian_gated"].learning == "hybrid"
        assert models["spiking_hebbian_gated"].gate == "surprise"
        assert models["spiking_hebbian"].gate == "constant"
        assert models["spiking_bptt"].learning == "bptt"
        assert {models[n].n_neurons for n in names} == {cfg.model.n_neurons}
        assert len(cfg.continual.seeds) >= 3


def test_reservoir_and_ewc():
    res = Reservoir(5, seed=0)
    for i in range(100):
        res.add(i)
    assert len(res.items) == 5 and res.seen == 100 and set(res.items) <= set(range(100))
    assert len(res.draw(3)) == 3 and Reservoir(5, 0).draw(3) == []
    model = tiny_model("mlp")
    ids = torch.randint(5, 100, (2, BLOCK))
    ewc = EWC(lam=1.0)
    assert ewc.penalty(model) is None
    ewc.consolidate(model, [(ids, ids, None)], reduce=lambda t: t)
    assert float(ewc.penalty(model).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        model.head.down.weight.add_(0.1)  # up.weight has no gradient while down = 0
    assert float(ewc.penalty(model).detach()) > 0


def _tokenizer(folder: Path, words: list[str]):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def test_checkpoint_with_another_tokenizer_is_refused(tmp_path):
    saved = _tokenizer(tmp_path / "ckpt", ["the", "cat"])
    saved.save_pretrained(tmp_path / "ckpt")
    same = _tokenizer(tmp_path / "same", ["the", "cat"])
    check_checkpoint_tokenizer(tmp_path / "ckpt", same)  # no error
    other = _tokenizer(tmp_path / "other", ["a", "dog"])
    with pytest.raises(DataError, match="different tokenizer.*model.encoder"):
        check_checkpoint_tokenizer(tmp_path / "ckpt", other)
    with pytest.raises(DataError, match="no readable tokenizer"):
        check_checkpoint_tokenizer(tmp_path / "nothing", other)


def test_tagged_blocks_keep_their_split():
    b = TaggedBlocks(synthetic(5, 40, 2, 0), "a", "test")
    assert (b.domain, b.split, len(b)) == ("a", "test", 2)
    assert dataclasses.is_dataclass(ContinualConfig)


@pytest.mark.slow
def test_real_run_end_to_end(tmp_path):
    """The real encoder on two small real domains, two methods, two seeds (about a minute)."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "eval" / "continual.py"), "--config",
            "configs/continual_quick.yaml", "--no-wandb", f"output_dir={out}",
            "continual.order=[docs, legal]", "continual.seeds=[0, 1]",
            "continual.tokens_per_stage=1024", "data.max_eval_tokens_per_domain=512",
            "continual.eval_time_steps=[1, 2]",
            "continual.methods=[{name: finetune, head: mlp}, {name: spiking_hebbian_gated, "
            "head: spiking_pc, model: [learning=hybrid, gate=surprise]}]"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "continual.json").read_text())
    assert res["complete"] and res["equal_tokens_across_methods"]
    assert set(res["aggregate"]) == {"finetune", "spiking_hebbian_gated"}
    assert res["aggregate"]["finetune"]["metrics"]["loss"]["forgetting"]["n"] == 2
    assert res["feature_cache"]["blocks_served_from_cache"] > 0
    assert all(v == 0 for v in res["test_train_overlap_blocks"].values())
    md = (out / "continual.md").read_text()
    assert "## Verdict" in md and "nan" not in md.lower().replace("mean", "")
    for png in ("R_loss.png", "curves_loss.png", "forgetting.png", "pc_diagnostics.png"):
        assert (out / png).stat().st_size > 1000
    man = json.loads((out / "manifest.json").read_text())
    assert man["seeds"] == [0, 1] and man["domain_order"] == ["docs", "legal"]
    assert man["packages"]["torch"]
    # the report rebuilds from continual.json alone, as after an interruption
    sys.path.insert(0, str(ROOT / "eval"))
    import continual as script  # eval/continual.py

    (out / "continual.md").unlink()
    assert script.main(args[2:] + ["--report-only"]) == 0
    assert (out / "continual.md").read_text() == md
    assert json.loads((out / "manifest.json").read_text())["argv"] == man["argv"]


def test_cli_bad_order_is_a_clear_error(capsys):
    sys.path.insert(0, str(ROOT / "eval"))
    import continual as script  # eval/continual.py

    rc = script.main(["--config", "configs/continual_quick.yaml", "--no-wandb",
                      "continual.order=[docs, nowhere]"])
    assert rc == 2 and "continual.order[1]" in capsys.readouterr().err
    rc = script.main(["--config", "configs/continual_quick.yaml", "--no-wandb",
                      "continual.methods=[{name: x, head: mlp, model: [encoder=bert]}]"])
    assert rc == 2 and "continual.methods[0].model" in capsys.readouterr().err
