"""What a `files:` domain does with awkward inputs: records without text, broken JSON, empty
files, folders matched by a glob, one huge line."""


import pytest

from hybridlm.config import DataConfig, DomainConfig
from hybridlm.corpora import DataError, documents
from hybridlm.data import build_domain, split_passages


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
