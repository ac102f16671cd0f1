"""The data package holds no dead code, and its docstrings name only modules and files that exist."""

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = sorted((ROOT / "src/kiln/data").glob("*.py"))
OWN_DOCS = DATA + [ROOT / "src/kiln/config/data.py"]


def _sources():
    return {p: p.read_text() for d in ("src", "tests", "bench") for p in (ROOT / d).rglob("*.py")}


def test_every_function_and_class_in_the_data_package_is_used_somewhere():
    sources = _sources()
    unused = []
    for path in DATA:
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("__") and node.name.endswith("__"):
                continue   # Python itself calls a module's __getattr__ / __dir__
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            uses = sum(len(word.findall(text)) for text in sources.values())
            if uses <= 1:   # its own `def` / `class` line only
                unused.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not unused, f"defined but never used in src/, tests/ or bench/: {unused}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_docstrings_name_modules_and_files_that_exist():
    missing = []
    for path in OWN_DOCS:
        text = path.read_text()
        for dotted in re.findall(r"`(kiln(?:\.\w+)+)`", text):
            if not _resolves(dotted):
                missing.append(f"{path.name}: `{dotted}`")
        for rel in re.findall(r"\b((?:tests|docs|src)/[\w/.-]+\.(?:py|md))\b", text):
            if not (ROOT / rel).exists():
                missing.append(f"{path.name}: {rel}")
    assert not missing, missing
