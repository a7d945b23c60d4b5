"""The embedded chat dataset: questions and answers about the Python standard library, made from
its own docstrings and signatures (``inspect``), so that SFT runs anywhere without network.

A fixed module list read in a fixed order; for every public documented function, class and
method, "What does X do?" answered with its docstring's first paragraph (every other one followed
by "What is its signature?"), and "What is the signature of X?" where ``inspect`` knows it. 3,587
conversations on CPython 3.11.7 on Linux, built in well under a second; the same on every run of
one Python version and platform (the docstrings, and e.g. which functions ``os`` has, are
theirs).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "filecmp", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "os.path",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex", "shutil",
    "socket", "statistics", "string", "struct", "subprocess", "sys", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "typing", "unicodedata",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip
"""One shard each (data-parallel ranks split the dataset by modules)."""

SYSTEM = "You answer questions about the Python standard library briefly and exactly."
_ASK = ("What does {} do?", "Explain {} in a few words.", "What is {} for?")


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n", 1)[0].split())


def _signature(obj: Any) -> str | None:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):  # some builtins have no introspectable signature
        return None


def _documented(module_name: str) -> Iterator[tuple[str, str, str | None]]:
    """(qualified name, first docstring paragraph, signature or None) of the module's public
    documented functions and classes it defines, then of each class's public methods."""
    module = importlib.import_module(module_name)
    for attr in sorted(dir(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or not callable(obj):
            continue
        if getattr(obj, "__module__", None) != module.__name__ and not inspect.isbuiltin(obj):
            continue  # imported from elsewhere
        name = f"{module_name}.{attr}"
        if doc := inspect.getdoc(obj):
            yield name, _first_paragraph(doc), _signature(obj)
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_") or not callable(method):
                    continue
                if doc := inspect.getdoc(method):
                    yield f"{name}.{method_name}", _first_paragraph(doc), _signature(method)


def conversations(modules: list[str]) -> Iterator[dict[str, Any]]:
    """The dataset's records (`system`, `messages`) for these modules, in order."""
    index = 0
    for module_name in modules:
        with warnings.catch_warnings():  # looking up typing.io and the like warns
            warnings.simplefilter("ignore", DeprecationWarning)
            documented = list(_documented(module_name))
        for name, answer, signature in documented:
            messages = [
                {"role": "user", "content": _ASK[index % len(_ASK)].format(name)},
                {"role": "assistant", "content": answer},
            ]
            if signature is not None and index % 2:
                messages += [
                    {"role": "user", "content": "What is its signature?"},
                    {"role": "assistant", "content": f"{name}{signature}"},
                ]
            yield {"system": SYSTEM if index % 4 == 0 else "", "messages": messages}
            if signature is not None:
                question = f"What is the signature of {name}?"
                yield {
                    "system": "",
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": f"{name}{signature}"},
                    ],
                }
            index += 1
