"""The continual-learning runner on a tiny model and synthetic domains; config errors; one
short real run (slow)."""

import dataclasses
import json
import math
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
    aggregate,
    check_checkpoint_tokenizer,
    check_replay_sizes,
    evaluate_row,
    make_plots,
    method_model_config,
    pm,
    require_split,
    run_sequence,
    verdict,
)
from hybridlm.continual.metrics import all_metrics
from hybridlm.corpora import DataError
from hybridlm.evaluation import ranks_agree
from tests.conftest import command, tiny_model

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16


def cli():
    """eval/continual.py, the command itself (its `main` and `--methods` parsing)."""
    return command("eval/continual.py")


def synthetic(lo: int, hi: int, n_blocks: int, seed: int) -> datasets.Dataset:
    """A domain whose tokens are drawn from [lo, hi): domains differ in their vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n_blocks, BLOCK), generator=g)
    mask = torch.ones_like(ids, dtype=torch.int8)
    mask[-1, BLOCK // 2:] = 0  # a padded last block, as data.pack writes it
    chars = 3 * mask.int()  # every real token covers 3 characters of text
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "chars": chars.tolist()})


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
    # more inner steps settle the code further: F_T / F_0 falls with T on every domain
    for d in "abc":
        e = [diag[t][d]["relative_energy"] for t in ("1", "2", "4")]
        assert e[0] > e[1] > e[2], (d, e)
    # the sweep restores the trained T, and at that T it is the last R row
    assert diag["4"]["c"]["loss"] == pytest.approx(g["R"]["loss"][-1][2], rel=1e-5)
    assert diag["1"]["c"]["loss"] != pytest.approx(g["R"]["loss"][-1][2], rel=1e-5)
    for r in results.values():  # bits per character: the loss in bits over the characters
        for j in range(3):
            assert r["R"]["bits_per_char"][-1][j] == pytest.approx(
                r["R"]["loss"][-1][j] / math.log(2) / 3, rel=1e-4)


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
    r = run(MethodConfig("finetune", "mlp"), stream=make_stream(eval_split="validation"))
    agg = aggregate({"finetune": [r]})
    lines = verdict(agg, ["a", "b", "c"], "validation")
    assert len(lines) == 1 and "no verdict" in lines[0] and "VALIDATION" in lines[0]
    files = make_plots(tmp_path, {"finetune": [r]}, agg, ["a", "b", "c"], "validation")
    assert "R_bits_per_char.png" in files and (tmp_path / "R_bits_per_char.png").stat().st_size


def test_diagnostics_aggregate_over_every_seed(tmp_path):
    runs = {"gated": [run(MethodConfig("gated", "spiking_pc"), "spiking_pc", diagnostics=True,
                          seed=seed, learning="hybrid", gate="surprise") for seed in (0, 1)]}
    d = aggregate(runs)["gated"]["diagnostics"]
    assert d["seeds"] == [0, 1] and d["trained_time_steps"] == 4
    assert sorted(d["by_T"], key=int) == ["1", "2", "4"]
    bpc = d["by_T"]["4"]["bits_per_char"]  # mean over domains, then over seeds
    per_seed = [sum(r["diagnostics"]["by_T"]["4"][o]["bits_per_char"] for o in "abc") / 3
                for r in runs["gated"]]
    assert bpc["n"] == 2 and bpc["mean"] == pytest.approx(sum(per_seed) / 2)
    assert bpc["std"] > 0  # the seeds differ
    energy = [d["by_T"][t]["relative_energy"]["mean"] for t in ("1", "2", "4")]
    assert energy[0] > energy[1] > energy[2]  # the code settles further with more steps
    assert "layer_vs_T.png" in make_plots(tmp_path, runs, aggregate(runs), ["a", "b", "c"])


def test_single_domain_sequence_metrics_not_defined():
    r = run(MethodConfig("finetune", "mlp"), stream=make_stream(order=("a",)))
    m = r["metrics"]["loss"]
    assert m["ACC"] is not None
    assert m["BWT"] is None and m["FWT"] is None and m["forgetting"] is None
    agg = aggregate({"finetune": [r]})
    assert agg["finetune"]["metrics"]["loss"]["BWT"]["mean"] is None
    assert "not defined" in " ".join(verdict(agg, ["a"]))
    assert pm(agg["finetune"]["metrics"]["loss"]["forgetting"]) == "not defined"


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
    """The shipped methods: every learning mode with the gate on and off, the controls and
    baselines, equal sizes; gated and ungated pairs differ only by the gate."""
    for path in ("configs/continual.yaml", "configs/continual_quick.yaml"):
        cfg = load_config(path)
        names = [m.name for m in cfg.continual.methods]
        assert names == ["finetune", "kwta", "spiking_bptt", "spiking_hybrid",
                         "spiking_hybrid_gated", "spiking_hebbian", "spiking_hebbian_gated",
                         "ewc", "replay", "derpp", "joint"]
        models = {m.name: method_model_config(cfg, i)
                  for i, m in enumerate(cfg.continual.methods)}
        for mode in ("hybrid", "hebbian"):
            gated, plain = models[f"spiking_{mode}_gated"], models[f"spiking_{mode}"]
            assert (gated.learning, gated.gate, plain.gate) == (mode, "energy", "constant")
            assert dataclasses.replace(gated, gate="constant") == plain
        assert models["spiking_bptt"].learning == "bptt"
        assert {models[n].n_neurons for n in names} == {cfg.model.n_neurons}
        by_name = {m.name: m for m in cfg.continual.methods}
        assert by_name["derpp"].replay_size == by_name["replay"].replay_size > 0
        assert by_name["derpp"].der_alpha > 0 and by_name["joint"].joint
        assert cfg.continual.retention is not None and len(cfg.continual.seeds) >= 3
    full = load_config("configs/continual.yaml")  # the full run reuses make train's features
    default = load_config("configs/default.yaml")
    assert dataclasses.replace(full.data, max_eval_tokens_per_domain=None) == \
        dataclasses.replace(default.data, max_eval_tokens_per_domain=None)
    assert full.model.encoder == "smollm2" and full.continual.card_run == default.output_dir


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


@pytest.mark.slow
def test_real_run_end_to_end(tmp_path):
    """The real encoder on two small real domains and the real retention text, four methods
    (fine-tuning, the gated spiking layer, DER++, joint), two seeds (about a minute)."""
    out = tmp_path / "run"
    args = ["--config",
            "configs/continual_quick.yaml", "--no-wandb", f"output_dir={out}",
            "continual.order=[docs, legal]", "continual.seeds=[0, 1]",
            "continual.tokens_per_stage=1024", "data.max_eval_tokens_per_domain=512",
            "continual.eval_time_steps=[1, 2]",
            "continual.methods=[{name: finetune, head: mlp}, {name: spiking_hybrid_gated, "
            "head: spiking_pc, model: [learning=hybrid, gate=energy]}, {name: derpp, head: mlp, "
            "replay_size: 8, der_alpha: 0.3}, {name: joint, head: mlp, joint: true}]"]
    assert cli().main(args) == 0  # in this process: no second interpreter start
    res = json.loads((out / "continual.json").read_text())
    assert res["complete"] and res["equal_tokens_across_methods"]
    agg = res["aggregate"]
    assert set(agg) == {"finetune", "spiking_hybrid_gated", "derpp", "joint"}
    assert agg["finetune"]["metrics"]["bits_per_char"]["forgetting"]["n"] == 2
    assert res["feature_cache"]["blocks_served_from_cache"] > 0
    assert all(v == 0 for v in res["test_train_overlap_blocks"].values())
    # GEM and Chaudhry figures recomputed from the saved matrices agree with the reported ones
    for name, rs in res["runs"].items():
        for r in rs:
            if r["joint"]:
                assert r["metrics"]["loss"]["ACC"] == pytest.approx(sum(r["final"]["loss"]) / 2)
                assert r["metrics"]["loss"]["forgetting"] is None  # not defined for joint
                continue
            for k in ("loss", "bits_per_char", "accuracy", "perplexity"):
                again = all_metrics(r["R"][k], r["baseline"][k], k)
                for m in ("ACC", "BWT", "FWT", "forgetting"):
                    assert again[m] == pytest.approx(r["metrics"][k][m]), (name, k, m)
        if not rs[0]["joint"]:
            f = [r["metrics"]["bits_per_char"]["forgetting"] for r in rs]
            assert agg[name]["metrics"]["bits_per_char"]["forgetting"]["mean"] == \
                pytest.approx(sum(f) / len(f))
    # retention: the news text before training and after each stage (joint: its one stage)
    for r in res["runs"]["finetune"]:
        assert len(r["retention"]["bits_per_char"]) == 3
        assert r["retention"]["bits_per_char"][0] == pytest.approx(
            res["runs"]["joint"][0]["retention"]["bits_per_char"][0])  # same untrained trunk
    assert len(res["runs"]["joint"][0]["retention"]["loss"]) == 2
    assert res["runs"]["derpp"][0]["stages"][1]["der_distillation_mean"] > 0
    assert sum(res["runs"]["joint"][0]["stages"][0]["token_slots"] for _ in [0]) == sum(
        s["token_slots"] for s in res["runs"]["finetune"][0]["stages"])
    md = (out / "continual.md").read_text()
    assert "## Verdict" in md and "nan" not in md.lower().replace("mean", "")
    assert "**The claim**" in md and "Retention text: `news`" in md
    for png in ("R_bits_per_char.png", "curves_bits_per_char.png", "forgetting.png",
                "retention.png", "layer_vs_T.png"):
        assert (out / png).stat().st_size > 1000
    man = json.loads((out / "manifest.json").read_text())
    assert man["seeds"] == [0, 1] and man["domain_order"] == ["docs", "legal"]
    assert man["packages"]["torch"]
    # the report rebuilds from continual.json alone, as after an interruption
    script = cli()
    (out / "continual.md").unlink()
    assert script.main(args + ["--report-only"]) == 0
    assert (out / "continual.md").read_text() == md
    assert json.loads((out / "manifest.json").read_text())["argv"] == man["argv"]


def test_cli_bad_order_is_a_clear_error(capsys):
    script = cli()
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
    "continual.methods=[{name: ewc, head: mlp, ewc_lambda: 100}, {name: derpp, head: mlp, "
    "replay_size: 16, der_alpha: 0.3}, {name: spiking_hebbian_gated, head: spiking_pc, "
    "model: [learning=hybrid, gate=surprise]}]"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """`accelerate launch` with two CPU ranks (gloo) at batch 4 against one process at batch
    8: the same global batches, so the same matrices up to float summation order. The two ranks
    start from a fresh interpreter (forking after OpenMP ran can deadlock); the one process
    runs here."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(ROOT / "eval" / "continual.py")]
    two = subprocess.run(launch + TWO_RANK_ARGS + [f"output_dir={tmp_path / 'two'}",
                                                   "train.batch_size=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env | {"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert cli().main(
        [*TWO_RANK_ARGS, f"output_dir={tmp_path / 'one'}", "train.batch_size=8"]) == 0
    r2 = json.loads((tmp_path / "two" / "continual.json").read_text())
    r1 = json.loads((tmp_path / "one" / "continual.json").read_text())
    assert r2["complete"] and r2["processes"] == 2 and r1["processes"] == 1
    assert r2["feature_cache"]["processes"] == 2
    # only rank 0 writes: one report, one manifest, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix != ".png") == [
        "card_summary.json", "continual.json", "continual.md", "manifest.json"]
    assert "2 process(es)" in (tmp_path / "two" / "continual.md").read_text()
    for name in ("ewc", "derpp", "spiking_hebbian_gated"):
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
        assert ("replay" in sync[0]) == (name == "derpp")
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
            if sa["der_distillation_mean"] is not None:
                assert sa["der_distillation_mean"] == pytest.approx(sb["der_distillation_mean"],
                                                                    rel=1e-3)
    d2 = r2["aggregate"]["spiking_hebbian_gated"]["diagnostics"]
    d1 = r1["aggregate"]["spiking_hebbian_gated"]["diagnostics"]
    for t in ("1", "2", "4"):
        assert d2["by_T"][t]["bits_per_char"]["mean"] == pytest.approx(
            d1["by_T"][t]["bits_per_char"]["mean"], rel=1e-4)


def test_a_stage_needs_a_batch_per_process():
    from hybridlm.continual import batches_per_stage

    cc = ContinualConfig(tokens_per_stage=4 * BLOCK, epochs_per_stage=1)
    assert batches_per_stage(cc, 2, BLOCK) == 2
    assert batches_per_stage(cc, 2, BLOCK, processes=2) == 2
    with pytest.raises(ConfigError, match="continual.tokens_per_stage.*fewer than the 4"):
        batches_per_stage(cc, 2, BLOCK, processes=4)


def test_joint_trains_every_domain_in_one_stage_with_the_same_tokens():
    ft = run(MethodConfig("finetune", "mlp"))
    joint = run(MethodConfig("joint", "mlp", joint=True))
    assert len(joint["stages"]) == 1 and "R" not in joint
    assert joint["stages"][0]["token_slots"] == sum(s["token_slots"] for s in ft["stages"])
    assert joint["stages"][0]["steps"] == sum(s["steps"] for s in ft["stages"])
    m = joint["metrics"]["loss"]
    assert m["ACC"] == pytest.approx(sum(joint["final"]["loss"]) / 3)
    assert m["BWT"] is None and m["forgetting"] is None
    # on average over the domains its test loss falls below the untrained model's
    assert sum(joint["final"]["loss"]) < sum(joint["baseline"]["loss"]), joint["baseline"]


def test_derpp_stores_the_logits_it_replays():
    """DER++ keeps y (D floats per token) instead of the logits (V): the LM head is frozen,
    so the logits rebuilt from y and the LM bias of that moment are the model's own."""
    from hybridlm.continual import replay_logits

    model = tiny_model("mlp").eval()
    ids = torch.randint(5, 100, (2, BLOCK))
    with torch.no_grad():
        model.head.down.weight.normal_()  # a non-zero correction
        model.lm_bias.normal_()
        y = model.corrected_state(ids)
        logits = model(input_ids=ids).logits
        assert torch.allclose(replay_logits(model, y, model.lm_bias.clone()), logits, atol=1e-5)
    replay = run(MethodConfig("replay", "mlp", replay_size=6))
    derpp = run(MethodConfig("derpp", "mlp", replay_size=6, der_alpha=1.0))
    assert derpp["stages"][0]["der_distillation_mean"] is None  # nothing stored yet
    assert derpp["stages"][1]["der_distillation_mean"] > 0
    assert derpp["R"] != replay["R"]  # the distillation term changes training
    assert derpp["stages"][1]["token_slots"] == replay["stages"][1]["token_slots"]


def test_kwta_head_passes_k_units_and_starts_as_the_identity():
    from hybridlm.heads import mlp_hidden

    model = tiny_model("kwta", kwta_fraction=0.25)
    mlp = tiny_model("mlp")
    assert model.head_parameters() == mlp.head_parameters()  # same size as the MLP
    hidden = mlp_hidden("mlp", 32, model.config)
    assert model.head.k == round(0.25 * hidden)
    ids = torch.randint(5, 100, (2, BLOCK))
    with torch.no_grad():
        z = model.top_layers(model.encoder_features(ids))
        assert torch.equal(model.corrected_state(ids), z)  # zero-initialised readout
        h = torch.relu(model.head.up(model.head.norm(z)))
    assert model.head(z).stats["active_fraction"] <= model.head.k / hidden + 1e-6
    # only the k largest units reach the readout: perturbing a losing unit changes nothing
    model.head.down.weight.data.normal_()
    losers = h.topk(hidden - model.head.k, dim=-1, largest=False).indices
    assert losers.numel() > 0
    with pytest.raises(ValueError, match="kwta_fraction"):
        from hybridlm.heads import KWTAHead
        KWTAHead(8, 4, 5)


def test_non_finite_stage_keeps_the_finished_stages(monkeypatch):
    """A stage whose loss stays NaN stops the sequence with a clear message; the stages before
    it are kept, and aggregation leaves the run out of the means and lists it."""
    model = tiny_model("mlp").train()
    real = type(model).forward
    calls = {"train": 0}

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.training and out.loss is not None:
            calls["train"] += 1
            if calls["train"] > 2:  # stage 1 has 2 steps (4 blocks, batch 2): stage 2 fails
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", forward)
    cc = dataclasses.replace(CC, tokens_per_stage=4 * BLOCK)
    res = run_sequence(model, MethodConfig("finetune", "mlp"), make_stream(), cc,
                       dataclasses.replace(TC, batch_size=1), seed=0,
                       accelerator=Accelerator(cpu=True))
    assert res["failed"]["stage"] == 2 and "NaN" in res["failed"]["message"]
    assert len(res["rows"]) == 1 and len(res["stages"]) == 1 and "R" not in res
    monkeypatch.undo()
    ok = run(MethodConfig("finetune", "mlp"), seed=1)
    agg = aggregate({"finetune": [res, ok]})["finetune"]
    assert agg["seeds"] == [1] and agg["failed"][0]["seed"] == 0


def test_bad_method_lists_are_clear_errors():
    script = cli()
    cfg = load_config("configs/continual_quick.yaml")
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['nope'\].*known: finetune"):
        script.select_methods(cfg.continual, "finetune,nope")
    assert script.select_methods(cfg.continual, "joint,finetune") == [10, 0]
    big = dataclasses.replace(cfg.continual, methods=[MethodConfig("replay", "mlp",
                                                                   replay_size=10_000)])
    with pytest.raises(ConfigError, match=r"methods\[0\]\.replay_size.*never fill"):
        check_replay_sizes(big, ["a", "b", "c"], 64)
    with pytest.raises(ConfigError, match="der_alpha"):
        load_config("configs/continual_quick.yaml",
                    ["continual.methods=[{name: d, head: mlp, der_alpha: 0.5}]"])
    with pytest.raises(ConfigError, match="retention"):
        load_config("configs/continual_quick.yaml",
                    ["continual.retention={name: docs, source: 'builtin:news'}"])


def test_retention_is_scored_before_and_after_every_stage():
    train = {d: synthetic(*r, 12, i) for i, (d, r) in enumerate(RANGES.items())}
    test = {d: synthetic(*r, 4, 100 + i) for i, (d, r) in enumerate(RANGES.items())}
    stream = Stream.build(["a", "b"], train, test, 4 * BLOCK,
                          retention=("general", synthetic(5, 119, 4, 7)))
    res = run(MethodConfig("finetune", "mlp"), stream=stream)
    assert len(res["retention"]["loss"]) == 3  # untrained, after a, after b
    assert res["retention"]["loss"][0] != res["retention"]["loss"][-1]
    with pytest.raises(AssertionError, match="TEST"):
        require_split(TaggedBlocks(synthetic(5, 40, 2, 0), "general", "train"), "test")


def test_disk_feature_cache_is_shared_between_runs(tmp_path):
    """The stream's features on disk: one training-pool entry laid out as make train's (the
    pools concatenated in domain order), one per scored split; a second run reuses them all
    and reports what that saved."""
    model = tiny_model("mlp")
    first = make_stream()
    first.cache_on_disk(model, tmp_path, 4, ["a", "b", "c"], progress=False)
    s1 = first.cache_summary()
    assert s1["disk_entries"] == 4 and s1["disk_entries_reused"] == 0
    ids = first.train["b"].ids[[2, 5]]
    with torch.no_grad():
        want = model.encoder_features(ids)
    assert torch.allclose(first.train_caches["b"].features(model, torch.tensor([2, 5]), ids),
                          want, atol=1e-5)  # domain b's rows sit after a's pool
    second = make_stream()
    second.cache_on_disk(model, tmp_path, 4, ["a", "b", "c"], progress=False)
    res = run(MethodConfig("finetune", "mlp"), stream=second)
    s2 = second.cache_summary()
    assert s2["disk_entries_reused"] == 4 and s2["encoder_seconds"] == 0
    assert s2["blocks_served_from_cache"] > 0 and s2["seconds_saved"] > 0
    in_memory = run(MethodConfig("finetune", "mlp"))  # the same run with in-memory caches
    for a, b in zip(res["R"]["loss"], in_memory["R"]["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
