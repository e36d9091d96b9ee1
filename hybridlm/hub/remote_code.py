"""The remote-code bundler: one self-contained `modeling_hybridlm.py` (plain torch +
transformers) and an `auto_map`, so a model folder loads with `trust_remote_code=True` where
hybridlm is not installed."""

from __future__ import annotations

import ast
from pathlib import Path

from hybridlm.hub.folder import CONFIG, _read_json
from hybridlm.io import CheckpointError

REMOTE_CODE = "modeling_hybridlm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_hybridlm.HybridConfig",
    "AutoModelForCausalLM": "modeling_hybridlm.HybridForCausalLM",
}


def _is_registration(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "register")


def _module_file(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):  # a name inside a module, not a module
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _rewrite(name: str, path: Path) -> tuple[str, set[str], set[str]]:
    """Source of module `name` with every `from hybridlm... import` turned into a lookup in
    the bundle and Auto registrations removed; returns (source, modules it needs, the names
    of `hybridlm.kernels` it uses: `kernels.<op>` or `from hybridlm.kernels import <name>`)."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement)
    deps: set[str] = set()
    kernels_names: set[str] = set()
    imported: set[str] = set()  # names imported from the kernels namespace itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hybridlm"
                                                for a in node.names):
            raise CheckpointError(f"cannot export {path}: use 'from hybridlm... import' "
                                  f"instead of '{ast.unparse(node)}'")
        if not (isinstance(node, ast.ImportFrom) and node.level == 0
                and (node.module or "").split(".")[0] == "hybridlm"):
            continue
        parts = []
        for a in node.names:
            full = f"{node.module}.{a.name}"
            target = full if _module_file(full) or full == "hybridlm.kernels" else node.module
            if target == "hybridlm":
                raise CheckpointError(f"cannot export {path}: '{ast.unparse(node)}' imports "
                                      "from the hybridlm package itself, not a module")
            deps.add(target)
            if target == "hybridlm.kernels":
                kernels_names.add(a.asname or a.name)
                if full != target:
                    imported.add(a.name)
            value = f"_bundle({target!r})" + ("" if target == full else f".{a.name}")
            parts.append(f"{a.asname or a.name} = {value}")
        indent = " " * node.col_offset
        edits.append((node.lineno, node.end_lineno, indent + "; ".join(parts) + "\n"))
    for node in tree.body:
        if _is_registration(node):
            edits.append((node.lineno, node.end_lineno, "pass  # Auto registration: "
                          "the folder's auto_map does it\n"))
    ops = imported | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id in kernels_names}
    for first, last, repl in sorted(edits, reverse=True):
        lines[first - 1 : last] = [repl]
    return "".join(lines), deps, ops


def modeling_source() -> str:
    """One self-contained modeling file (plain torch + transformers) for remote code.

    It bundles, verbatim except for their imports, `hybridlm.modeling` and every hybridlm
    module it needs (found by following `from hybridlm... import` statements, including those
    inside functions), each run as a private in-file module. `hybridlm.kernels` (compiled
    CPU/CUDA kernels) is replaced by its plain-torch reference: each `kernels.<op>` the model
    calls becomes `hybridlm.kernels.reference.<op>_reference`, the same function; a constant
    of `hybridlm.kernels` it uses (e.g. `BACKENDS`, which `hybridlm.config` checks against) is
    carried by value. Raises `CheckpointError` when the model uses something this can't carry.
    """
    import hybridlm
    import hybridlm.kernels

    sources: dict[str, str] = {}
    ops: set[str] = set()
    todo = ["hybridlm.modeling"]
    while todo:
        name = todo.pop()
        if name in sources or name == "hybridlm.kernels":
            continue
        path = _module_file(name)
        if path is None:
            raise CheckpointError(f"cannot export: module {name} has no Python source")
        sources[name], deps, used = _rewrite(name, path)
        ops |= used
        todo += sorted(deps)
    constants = {op: getattr(hybridlm.kernels, op) for op in ops
                 if isinstance(getattr(hybridlm.kernels, op, None), (tuple, dict, str, int, float))}
    ops -= set(constants)
    if ops:
        ref = "hybridlm.kernels.reference"
        if ref not in sources:
            sources[ref], _, _ = _rewrite(ref, _module_file(ref))
        ref_names = {n.name for n in ast.parse(sources[ref]).body
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        missing = sorted(op for op in ops if op != "reference"
                         and f"{op}_reference" not in ref_names)
        if missing:
            raise CheckpointError(
                f"cannot export: the model calls kernels.{missing[0]}, which has no plain-torch "
                f"{missing[0]}_reference in hybridlm/kernels/reference.py"
            )
    for name in sources:
        mod = name.split(".")
        if mod[:2] == ["hybridlm", "kernels"] and name != "hybridlm.kernels.reference":
            raise CheckpointError(f"cannot export: {name} is a compiled-kernel module")
    kernel_ops = "".join(
        f"    {op} = _bundle('hybridlm.kernels.{op}')\n" if f"hybridlm.kernels.{op}" in sources
        else f"    {op} = staticmethod(_torch_backend(_bundle('hybridlm.kernels.reference')"
        f".{op}_reference))\n" for op in sorted(ops)
    ) + "".join(f"    {k} = {v!r}\n" for k, v in sorted(constants.items()))
    table = "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(sources.items()))
    return f'''"""hybridlm {hybridlm.__version__}: HybridConfig and HybridForCausalLM as one
self-contained file (plain torch + transformers), for `trust_remote_code=True` where hybridlm
is not installed.

Generated by hybridlm.hub.export_remote_code. `_SOURCES` holds the hybridlm modules the model
needs, verbatim except that `from hybridlm... import x` became `x = _bundle(...).x`; each runs
as a private module. The compiled kernels are replaced by their plain-torch reference.
"""

from __future__ import annotations

import sys
import types

_SOURCES = {{
{table}}}
_MODULES: dict[str, types.ModuleType] = {{}}


def _torch_backend(fn):
    def call(*args, backend=None, method=None, **kwargs):
        return fn(*args, **kwargs)  # the plain-torch backend computes the same function

    return call


def _bundle(name: str):
    """The bundled module `name` (run on first use), or the kernels namespace."""
    if name == "hybridlm.kernels":
        return _Kernels
    if name not in _MODULES:
        module = types.ModuleType(f"{{__name__}}.{{name.replace('.', '_')}}")
        _MODULES[name] = module
        sys.modules[module.__name__] = module
        module._bundle = _bundle
        exec(compile(_SOURCES[name], name.replace(".", "/") + ".py", "exec"), module.__dict__)
    return _MODULES[name]


class _Kernels:
    """The `hybridlm.kernels` ops the model calls, on the plain-torch backend, and the
    constants it reads."""
{kernel_ops}

_modeling = _bundle("hybridlm.modeling")
HybridConfig = _modeling.HybridConfig
HybridForCausalLM = _modeling.HybridForCausalLM
for _cls in (HybridConfig, HybridForCausalLM):
    _cls.__module__ = __name__  # save_pretrained copies this file, not a bundled module
'''


def export_remote_code(folder: str | Path) -> Path:
    """Write `modeling_hybridlm.py` into `folder` and an `auto_map` into its `config.json`, so
    the folder loads with `trust_remote_code=True` where hybridlm is not installed."""
    from hybridlm.io import write_json_atomic, write_text_atomic

    folder = Path(folder)
    cfg = _read_json(folder / CONFIG)
    source = modeling_source()
    compile(source, REMOTE_CODE, "exec")  # a syntax error here, not on the user's machine
    write_text_atomic(folder / REMOTE_CODE, source)
    write_json_atomic(folder / CONFIG, cfg | {"auto_map": AUTO_MAP})
    return folder / REMOTE_CODE

