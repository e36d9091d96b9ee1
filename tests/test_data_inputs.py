"""What a `files:` domain does with awkward inputs, and how its cache entry is kept safe:
records without text, broken JSON, empty files, folders matched by a glob, one huge line, a
cache entry changed on disk, the temporary folders of killed builds, two builds at once."""

import fcntl
import json
import shutil
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybridlm.config import DataConfig, DomainConfig
from hybridlm.corpora import DataError, documents
from hybridlm.data import build_corpora, build_domain, split_passages


@pytest.fixture(scope="module")
def tokenizer():
    """A fast word-level tokenizer of a few words: cheap to build with and to fingerprint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[SEP]", "[PAD]", "the", "quick", "fox", "jumps", *"0123456789"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]",
                                   sep_token="[SEP]", pad_token="[PAD]")


def _cfg(tmp_path, **kw):
    kw = {"domains": [], "block_size": 16, "passage_chars": 200,
          "cache_dir": str(tmp_path / "cache")} | kw
    return DataConfig(**kw)


def _texts(folder, n=9):
    """`n` text files of a few paragraphs each in `folder`."""
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(
            "\n\n".join(f"Paragraph {j} of document {i}: the quick brown fox." for j in range(4)))
    return folder


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("value, kind", [("null", "null"), ("3", "a number"),
                                         ('["a"]', "a list"), ("true", "a boolean")])
def test_a_record_whose_text_is_not_a_string_is_refused_naming_file_and_line(
        tmp_path, suffix, value, kind):
    good = '{"text": "some words here"}'
    lines = [good, good, f'{{"text": {value}}}', good]
    p = tmp_path / f"d{suffix}"
    # line 3 of the .jsonl; line 4 of the .json (the "[" is line 1)
    p.write_text("\n".join(lines) if suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]")
    line = 3 if suffix == ".jsonl" else 4
    with pytest.raises(DataError, match=f"d{suffix}, line {line}: 'text' is {kind}, not a string"):
        list(documents(f"files:{p}"))


def test_an_unpaired_surrogate_is_not_text(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "half \\ud83e of an emoji"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: 'text' holds an unpaired surrogate"):
        list(documents(f"files:{p}"))


def test_json_errors_name_the_file_and_the_line(tmp_path):
    # U+2028 may sit inside a JSON string: it must not count as a line break
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a\u2028b"}\n\n{"text": "ok"}\n{"text": "cut\n{"text": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 4: invalid JSON \(Unterminated string"):
        list(documents(f"files:{p}"))
    doc = tmp_path / "d.json"
    doc.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')
    with pytest.raises(DataError, match=r"d.json, line 4: invalid JSON \(Expecting ','"):
        list(documents(f"files:{doc}"))
    doc.write_text("[" * 100_000)  # deeper than Python's recursion allows
    with pytest.raises(DataError, match=r"d.json: invalid JSON \(nested too deeply\)"):
        list(documents(f"files:{doc}"))
    # a record's line in a multi-line .json document
    doc.write_text('[\n  {"text": "a"},\n\n  {"body":\n "b"}\n]')
    with pytest.raises(DataError, match=r"d.json, line 4: the record has no 'text' field"):
        list(documents(f"files:{doc}"))


def test_empty_json_files_hold_no_records(tmp_path, tokenizer):
    folder = _texts(tmp_path / "in")
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.jsonl").write_text("\n  \n")
    (folder / "empty.json").write_text(" \n")
    (folder / "bom.jsonl").write_text('\ufeff{"text": "the fox"}\n')  # a byte-order mark
    data = build_domain(DomainConfig(name="mixed", source=f"files:{folder}/*"), _cfg(tmp_path),
                        tokenizer, tmp_path / "cache")
    assert data.stats["documents"] == 10
    only = DomainConfig(name="hollow", source=f"files:{folder}/empty.json*,{folder}/blank.jsonl")
    with pytest.raises(DataError, match=r"domain 'hollow' \(files:.*\) has no text: 0 doc"):
        build_domain(only, _cfg(tmp_path), tokenizer, tmp_path / "cache")


def test_folders_matched_by_a_glob_are_skipped(tmp_path):
    folder = _texts(tmp_path / "in", n=2)
    (folder / "sub.txt").mkdir()  # a folder whose name matches *.txt
    (folder / "sub.txt" / "inner.txt").write_text("not read: its folder is skipped")
    ids = [doc_id for doc_id, _ in documents(f"files:{folder}/*.txt")]
    assert ids == [str(folder / "doc0.txt"), str(folder / "doc1.txt")]
    deep = [doc_id for doc_id, _ in documents(f"files:{folder}/**/*.txt")]
    assert str(folder / "sub.txt" / "inner.txt") in deep and len(deep) == 3
    with pytest.raises(DataError, match=r"only folders match '.*sub.txt'.*folder/\*\*/\*\.txt"):
        list(documents(f"files:{folder}/sub.txt"))


def test_one_huge_line_becomes_many_passages(tmp_path, tokenizer):
    line = " ".join(f"word{i}" for i in range(4000))  # ~35,000 characters, no line break
    passages = split_passages(line, 200)
    assert len(passages) > 150 and max(map(len, passages)) <= 200
    assert "".join(passages).split() == line.split()
    assert max(map(len, split_passages("x" * 5000, 200))) == 200  # no space: cut mid-word
    p = tmp_path / "one_line.txt"
    p.write_text(line)
    data = build_domain(DomainConfig(name="line", source=f"files:{p}"), _cfg(tmp_path),
                        tokenizer, tmp_path / "cache")
    n = data.stats["passages"]
    assert n["train"] > 10 * n["validation"] > 0


def _built(tmp_path, tokenizer, name="foxes"):
    dom = DomainConfig(name=name, source=f"files:{_texts(tmp_path / 'in')}/*.txt")
    return dom, build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache")


def test_the_cache_checks_its_content(tmp_path, tokenizer, capsys):
    dom, first = _built(tmp_path, tokenizer)
    test_ids = first.splits["test"]["input_ids"][:]  # read now: the file is changed below
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    arrow = "data-00000-of-00001.arrow"
    shutil.copy(entry / "validation" / arrow, entry / "test" / arrow)
    again = build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache")
    assert not again.stats["cached"]
    assert f"test/{arrow} does not match its checksum" in capsys.readouterr().out
    assert again.splits["test"]["input_ids"] == test_ids
    assert build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache").stats["cached"]
    (entry / "train" / arrow).unlink()
    assert not build_domain(dom, _cfg(tmp_path), tokenizer, tmp_path / "cache").stats["cached"]
    assert f"train/{arrow} is missing" in capsys.readouterr().out


def test_the_cache_removes_the_folders_of_killed_builds(tmp_path, tokenizer):
    cache = tmp_path / "cache" / "data"
    dom = DomainConfig(name="foxes", source=f"files:{_texts(tmp_path / 'in')}/*.txt")
    cfg = _cfg(tmp_path, domains=[dom])
    stale = [cache / "foxes-0123456789abcdef.tmp41", cache / "other-fedcba9876543210.tmp7"]
    live = cache / "busy-00112233445566aa.tmp12"
    for folder in [*stale, live]:
        (folder / "train").mkdir(parents=True)
    keep = cache / "notes.tmp1"  # not the cache's own: left alone
    keep.mkdir()
    with open(cache / "busy-00112233445566aa.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a live build holds its entry
        build_corpora(cfg, tokenizer, progress=False)
    assert not any(p.exists() for p in stale) and live.is_dir() and keep.is_dir()
    build_corpora(cfg, tokenizer, progress=False)
    assert not live.exists()


def test_two_builds_of_one_entry_wait_for_each_other(tmp_path, tokenizer, capsys):
    """Two builds of one entry at once: the second waits for the first, then reuses it."""
    dom, _ = _built(tmp_path, tokenizer)  # in tmp_path/cache: names the entry
    (entry,) = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    cache = tmp_path / "shared"
    results, errors = [], []

    def build():
        try:
            results.append(build_domain(dom, _cfg(tmp_path), tokenizer, cache))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    cache.mkdir()
    with open(cache / f"{entry}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both builds start while a third holds the entry
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert all(t.is_alive() for t in threads) and not (cache / entry).exists()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.stats["cached"] for r in results) == [False, True]
    assert results[0].splits["train"]["input_ids"] == results[1].splits["train"]["input_ids"]
    assert capsys.readouterr().out.count("is being built by another process") == 2


def test_an_empty_cache_dir_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dom = DomainConfig(name="foxes", source=f"files:{_texts(tmp_path / 'in')}/*.txt")
    with pytest.raises(DataError, match="data.cache_dir is empty"):
        build_corpora(_cfg(tmp_path, domains=[dom], cache_dir=""), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# -- fuzz: any files: corpus builds, or is refused with a DataError naming the file --------

_PROSE = st.lists(st.sampled_from(["the", "quick", "fox", "jumps", "naïve", "🦊", "\t", "\n",
                                   "\n\n", "x" * 150]), min_size=20, max_size=120).map(" ".join)
_GOOD_RECORD = st.builds(lambda t: json.dumps({"text": t}), _PROSE)
_BAD_RECORD = st.sampled_from([
    '{"text": null}', '{"text": 7}', '{"text": ["a"]}', '{"body": "x"}', '"just a string"',
    "[]", "{", '{"text": "\\ud800"}', "1" * 5000, "", json.dumps({"text": "long " * 300})])
_RECORDS = st.lists(st.one_of(_GOOD_RECORD, _BAD_RECORD), max_size=5)


def _maybe(good, bad):
    """`good`, or `bad` in one case of four (most files should be valid, so that whole
    corpora often build)."""
    return st.tuples(st.integers(0, 3), good, bad).map(lambda t: t[2] if t[0] == 0 else t[1])


_FILE = st.one_of(
    st.tuples(st.just(".txt"), _maybe(_PROSE, st.one_of(
        st.text(max_size=300), st.sampled_from(["", "\n\n  \n", "y" * 1000])))
        .map(str.encode) | st.binary(max_size=60)),
    st.tuples(st.just(".jsonl"), _maybe(st.lists(_GOOD_RECORD, max_size=5), _RECORDS)
              .map(lambda lines: "\n".join(lines).encode())),
    st.tuples(st.just(".json"), _maybe(st.lists(_GOOD_RECORD, max_size=5), _RECORDS)
              .map(lambda r: ("[\n" + ",\n".join(r) + "\n]").encode())),
    st.tuples(st.just(".json"), st.one_of(_GOOD_RECORD, _BAD_RECORD).map(str.encode)),
    st.tuples(st.just(".txt"), st.just(("word " * 2000).encode())),  # one huge line
    st.tuples(st.just("/"), st.just(b"")),  # a folder
)
_FILES = st.lists(_FILE, min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=_FILES)
def test_fuzz_files_corpora_build_or_name_the_file(tmp_path, tokenizer, files):
    root = tmp_path / f"in{len(list(tmp_path.glob('in*')))}"
    root.mkdir()
    for i, (kind, content) in enumerate(files):
        if kind == "/":
            (root / f"folder{i}.txt").mkdir()
        else:
            (root / f"f{i}{kind}").write_bytes(content)
    dom = DomainConfig(name="fuzz", source=f"files:{root}/*")
    cfg = _cfg(tmp_path, passage_chars=100)
    cache = tmp_path / "cache"
    try:
        first = build_domain(dom, cfg, tokenizer, cache)
    except DataError as e:
        assert str(root) in str(e) or "domain 'fuzz'" in str(e), str(e)
        event(str(e).replace(str(root), "")[:30])
        first = None
    assert not list(cache.glob("*.tmp*")) if cache.exists() else True
    if first is not None:  # what it left is reused as it is
        event("built")
        again = build_domain(dom, cfg, tokenizer, cache)
        assert again.stats == first.stats | {"cached": True}
