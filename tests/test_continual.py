"""The continual-learning runner on a tiny model and synthetic domains; config errors; one
short real run (slow)."""

import dataclasses
import json
import os
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
    ranks_agree,
    require_split,
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


def make_stream(order=("a", "b", "c"), tokens_per_stage=4 * BLOCK, cache=True,
                eval_split="test") -> Stream:
    train = {d: synthetic(*r, 12, i) for i, (d, r) in enumerate(RANGES.items())}
    test = {d: synthetic(*r, 4, 100 + i) for i, (d, r) in enumerate(RANGES.items())}
    return Stream.build(list(order), train, test, tokens_per_stage, cache=cache,
                        eval_split=eval_split)


CC = ContinualConfig(seeds=[0], tokens_per_stage=4 * BLOCK, replay_fraction=0.5,
                     fisher_batches=2, eval_time_steps=[1, 2])
TC = TrainConfig(batch_size=2, lr=0.01, warmup_fraction=0.0)


def run(method: MethodConfig, head="mlp", stream=None, diagnostics=False, seed=0, **model_kw):
    torch.manual_seed(seed)
    model = tiny_model(head, **model_kw).train()
    return run_sequence(model, method, stream or make_stream(), CC, TC, seed=seed,
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
    assert len(diag["4"]["a"]["energy_per_step"]) == 5  # F after 0..T steps
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


def test_tuning_run_scores_validation_and_never_test():
    """continual.eval_split=validation (tuning only) tags the scored blocks as validation;
    each mode refuses the other's split, and train blocks are refused by both."""
    stream = make_stream(eval_split="validation")
    assert {b.split for b in stream.test.values()} == {"validation"}
    row = evaluate_row(tiny_model("mlp"), stream, Accelerator(cpu=True), 4)
    assert set(row) == {"a", "b", "c"}
    normal = make_stream()
    stream.test["b"] = normal.test["b"]  # a test split in a tuning run
    with pytest.raises(AssertionError, match="VALIDATION splits only.*'test' of domain 'b'"):
        evaluate_row(tiny_model("mlp"), stream, Accelerator(cpu=True), 4)
    normal.test["a"] = make_stream(eval_split="validation").test["a"]  # the reverse
    with pytest.raises(AssertionError, match="TEST splits.*'validation' of domain 'a'"):
        evaluate_row(tiny_model("mlp"), normal, Accelerator(cpu=True), 4)
    for split in ("test", "validation"):
        with pytest.raises(AssertionError, match="'train' of domain 'c'"):
            require_split(normal.train["c"], split)
    with pytest.raises(ConfigError, match="continual.eval_split"):
        make_stream(eval_split="train")
    with pytest.raises(ConfigError, match="continual.eval_split"):
        load_config("configs/continual_quick.yaml", ["continual.eval_split=train"])
    assert load_config("configs/continual.yaml").continual.eval_split == "test"  # the default


def test_tuning_run_report_is_labelled(tmp_path):
    sys.path.insert(0, str(ROOT / "eval"))
    import continual as script  # eval/continual.py

    r = run(MethodConfig("finetune", "mlp"), stream=make_stream(eval_split="validation"))
    agg = script.aggregate({"finetune": [r]})
    lines = script.verdict(agg, ["a", "b", "c"], "validation")
    assert len(lines) == 1 and "no verdict" in lines[0] and "VALIDATION" in lines[0]
    files = script.make_plots(tmp_path, {"finetune": [r]}, agg, ["a", "b", "c"], "validation")
    assert "R_loss.png" in files


def test_diagnostics_aggregate_over_every_seed(tmp_path):
    sys.path.insert(0, str(ROOT / "eval"))
    import continual as script  # eval/continual.py

    runs = {"gated": [run(MethodConfig("gated", "spiking_pc"), "spiking_pc", diagnostics=True,
                          seed=seed, learning="hybrid", gate="surprise") for seed in (0, 1)]}
    d = script.aggregate(runs)["gated"]["diagnostics"]
    assert d["seeds"] == [0, 1] and d["trained_time_steps"] == 4
    assert sorted(d["by_T"], key=int) == ["1", "2", "4"]
    ppl = d["by_T"]["4"]["perplexity_domain_mean"]
    per_seed = [sum(r["diagnostics"]["by_T"]["4"][o]["perplexity"] for o in "abc") / 3
                for r in runs["gated"]]
    assert ppl["n"] == 2 and ppl["mean"] == pytest.approx(sum(per_seed) / 2)
    assert ppl["std"] > 0  # the seeds differ
    assert len(d["energy_per_step"]["mean"]) == len(d["energy_per_step"]["std"]) == 5
    assert "pc_diagnostics.png" in script.make_plots(tmp_path, runs, script.aggregate(runs),
                                                     ["a", "b", "c"])


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
    # several processes: each batch's gradient is averaged over ranks BEFORE squaring (the
    # Fisher of the global batch); a reduce that doubles the gradient quadruples the Fisher
    doubled = EWC(lam=1.0)
    doubled.consolidate(model, [(ids, ids, None)], reduce=lambda t: 2 * t)
    ewc.consolidate(model, [(ids, ids, None)], reduce=lambda t: t)
    assert torch.allclose(doubled.flat_fisher(), 4 * ewc.flat_fisher()[-len(
        doubled.flat_fisher()):])
    assert Reservoir(5, 3).fingerprint().tolist() == [[0, -1], [0, 0]]
    a, b = Reservoir(4, seed=1), Reservoir(4, seed=1)
    for i in range(20):
        a.add(("x", i))
        b.add(("x", i))
    assert torch.equal(a.fingerprint(), b.fingerprint())
    assert ranks_agree(Accelerator(cpu=True), a.fingerprint())  # one process: trivially


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


TWO_RANK_ARGS = [
    "--config", "configs/continual_quick.yaml", "--no-wandb", "continual.seeds=[0]",
    "continual.order=[docs, legal]", "continual.tokens_per_stage=1024",
    "data.max_eval_tokens_per_domain=512", "continual.eval_time_steps=[1, 2]",
    "continual.fisher_batches=2",
    "continual.methods=[{name: ewc, head: mlp, ewc_lambda: 100}, {name: replay, head: mlp, "
    "replay_size: 16}, {name: spiking_hebbian_gated, head: spiking_pc, "
    "model: [learning=hybrid, gate=surprise]}]"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """`accelerate launch` with two CPU ranks (gloo) at batch 4 against one process at batch
    8: the same global batches, so the same matrices up to float summation order. Both start
    from a fresh interpreter (forking after OpenMP ran can deadlock). About 60 s."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(ROOT / "eval" / "continual.py")]
    two = subprocess.run(launch + TWO_RANK_ARGS + [f"output_dir={tmp_path / 'two'}",
                                                   "train.batch_size=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env | {"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(ROOT / "eval" / "continual.py"), *TWO_RANK_ARGS,
                          f"output_dir={tmp_path / 'one'}", "train.batch_size=8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    r2 = json.loads((tmp_path / "two" / "continual.json").read_text())
    r1 = json.loads((tmp_path / "one" / "continual.json").read_text())
    assert r2["complete"] and r2["processes"] == 2 and r1["processes"] == 1
    assert r2["feature_cache"]["processes"] == 2
    # only rank 0 writes: one report, one manifest, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix != ".png") == [
        "continual.json", "continual.md", "manifest.json"]
    assert "2 process(es)" in (tmp_path / "two" / "continual.md").read_text()
    for name in ("ewc", "replay", "spiking_hebbian_gated"):
        a, b = r2["runs"][name][0], r1["runs"][name][0]
        # every stage trained (no step skipped), on the same tokens, all test blocks scored
        assert [s["skipped_steps"] for s in a["stages"]] == [0, 0]
        assert [s["steps"] for s in a["stages"]] == [s["steps"] for s in b["stages"]] == [2, 2]
        assert [s["tokens"] for s in a["stages"]] == [s["tokens"] for s in b["stages"]]
        assert a["R"]["loss"][0][0] < a["baseline"]["loss"][0]  # training lowered the loss
        # weights, EWC Fisher and replay buffer are bit-identical on both ranks after each stage
        sync = a["ranks_identical"]
        assert len(sync) == 2 and all(all(v for k, v in st.items() if k != "stage")
                                      for st in sync)
        assert ("fisher" in sync[0]) == (name == "ewc")
        assert ("replay" in sync[0]) == (name == "replay")
        for k in ("loss", "accuracy"):
            assert a["baseline"][k] == pytest.approx(b["baseline"][k], abs=1e-6)
            for ra, rb in zip(a["R"][k], b["R"][k], strict=True):
                assert ra == pytest.approx(rb, abs=1e-4), (name, k)
        for sa, sb in zip(a["stages"], b["stages"], strict=True):
            assert sa["train_loss"] == pytest.approx(sb["train_loss"], abs=1e-4)
            if sa["ewc_penalty_mean"] is not None:
                assert sa["ewc_penalty_mean"] == pytest.approx(sb["ewc_penalty_mean"], rel=1e-3)
            if sa["gate_mean"] is not None:
                assert sa["gate_mean"] == pytest.approx(sb["gate_mean"], abs=1e-4)
    d2 = r2["aggregate"]["spiking_hebbian_gated"]["diagnostics"]
    d1 = r1["aggregate"]["spiking_hebbian_gated"]["diagnostics"]
    for t in ("1", "2", "4"):
        assert d2["by_T"][t]["perplexity_domain_mean"]["mean"] == pytest.approx(
            d1["by_T"][t]["perplexity_domain_mean"]["mean"], rel=1e-4)


def test_a_stage_needs_a_batch_per_process():
    from hybridlm.continual import batches_per_stage

    cc = ContinualConfig(tokens_per_stage=4 * BLOCK, epochs_per_stage=1)
    assert batches_per_stage(cc, 2, BLOCK) == 2
    assert batches_per_stage(cc, 2, BLOCK, processes=2) == 2
    with pytest.raises(ConfigError, match="continual.tokens_per_stage.*fewer than the 4"):
        batches_per_stage(cc, 2, BLOCK, processes=4)
