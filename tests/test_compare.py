"""make compare's statistics: paired differences over seeds, the spread, the 22% claim."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compare", ROOT / "eval" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

DOMAINS = ("a", "b")


def _split(ppl_a, ppl_b, bpc_a, bpc_b, extra=None):
    return {"a": {"perplexity": ppl_a, "bits_per_char": bpc_a} | (extra or {}),
            "b": {"perplexity": ppl_b, "bits_per_char": bpc_b} | (extra or {})}


def _run(seed, spiking_shift):
    layer = {"firing_rate": 0.02, "spikes_per_token": 40.0, "active_steps": 7.0,
             "relative_energy": 0.3, "max_neuron_rate": 0.1}
    heads = {
        "trunk": {"trainable_parameters": 0, "validation": _split(100.0, 20.0, 2.0, 1.0),
                  "test": _split(100.0, 20.0, 2.0, 1.0)},
        "mlp": {"trainable_parameters": 10,
                "validation": _split(80.0, 16.0, 1.8, 0.9), "test": _split(80.0, 16.0, 1.8, 0.9)},
        "spiking_pc": {"trainable_parameters": 10,
                       "validation": _split(70.0 + spiking_shift, 15.0, 1.7 + spiking_shift / 100,
                                            0.85, layer),
                       "test": _split(70.0, 15.0, 1.7, 0.85, layer),
                       "time_sweep": {"1": _split(90.0, 18.0, 1.9, 0.95, layer),
                                      "8": _split(70.0, 15.0, 1.7, 0.85, layer)},
                       "operations_per_token": {"mac": 100.0, "sop": 5.0,
                                                "dense_equivalent_mac": 300.0, "energy_pj": 1.0,
                                                "dense_energy_pj": 3.0, "caveat": "no memory"}},
    }
    return {"seed": seed, "heads": heads}


def test_paired_differences_and_spread_by_hand():
    runs = [_run(0, 0.0), _run(1, 2.0), _run(2, -2.0)]
    agg = compare.aggregate(runs)
    d = agg["paired"]["spiking_pc - mlp"]["validation"]["a"]
    assert d["values"] == pytest.approx([-0.1, -0.08, -0.12])
    assert d["mean"] == pytest.approx(-0.1) and d["std"] == pytest.approx(0.02)
    assert d["beats_spread"] and d["same_sign"]
    rel = agg["paired"]["spiking_pc - trunk"]["validation"]["relative_perplexity"]
    # per seed: mean over domains of ppl ratio - 1, e.g. seed 0: (70/100 - 1 + 15/20 - 1) / 2
    assert rel["values"][0] == pytest.approx(((0.7 - 1) + (0.75 - 1)) / 2)
    claim = agg["claim"]
    assert claim["trunk"]["holds"] and not claim["mlp"]["holds"]  # -27.5% vs trunk, -9% vs mlp
    assert set(agg["layers"]) == {"spiking_pc"}
    sweep = agg["layers"]["spiking_pc"]["time_sweep"]
    assert sweep["1"]["mean_bpc"]["mean"] == pytest.approx(1.425)
    text = compare.markdown(agg, "configs/x.yaml", 60.0)
    assert "| spiking_pc - mlp |" in text and "## The 22% claim" in text
    assert compare.figure(agg).startswith(b"\x89PNG")


def test_a_difference_inside_the_spread_is_called_so():
    runs = [_run(0, 0.0), _run(1, 30.0), _run(2, -30.0)]  # literature swings by +-0.3 bpc
    d = compare.aggregate(runs)["paired"]["spiking_pc - mlp"]["validation"]["a"]
    assert not d["beats_spread"] and not d["same_sign"]


def test_bad_seeds_are_refused(capsys):
    assert compare.main(["--seeds", "0,x"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert compare.main(["--seeds", "1,1"]) == 2
