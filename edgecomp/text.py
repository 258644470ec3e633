"""Text to DATA: tokenize lines of text with a local Hugging Face tokenizer.

Also a source of real English offline: the docstrings of installed Python modules, split into
sentences (used by the benchmarks; nothing is downloaded).
"""

from __future__ import annotations

import importlib
import os
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgecomp.errors import DataError, InputFileError
from edgecomp.io import first_line

__all__ = ["load_tokenizer", "tokenize", "write_token_data", "docstring_sentences", "read_lines", "STDLIB_MODULES"]

STDLIB_MODULES = (
    "os", "json", "collections", "argparse", "pathlib", "re", "subprocess", "threading", "asyncio", "logging",
    "unittest", "typing", "functools", "itertools", "email", "http.client", "urllib.request", "xml.etree.ElementTree",
    "sqlite3", "csv", "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "difflib",
    "pickle", "shelve", "zipfile", "tarfile", "tempfile", "shutil", "socket", "ssl", "select", "selectors",
    "multiprocessing", "concurrent.futures", "contextlib", "dataclasses", "enum", "inspect", "ast", "dis",
    "importlib", "pkgutil", "zipimport", "codecs", "locale", "gettext", "calendar", "heapq", "bisect", "array",
    "weakref", "copy", "pprint", "reprlib", "operator", "math", "cmath", "hashlib", "hmac", "secrets", "base64",
    "binascii", "struct", "io", "time", "sched", "queue", "signal", "mmap", "ctypes", "doctest", "pdb", "trace",
    "tracemalloc", "gc", "site", "sysconfig", "platform", "errno", "glob", "fnmatch", "linecache", "tokenize",
    "configparser", "netrc", "plistlib", "mailbox", "mimetypes", "html.parser", "webbrowser", "wsgiref.util",
    "uuid", "ipaddress", "numbers", "abc", "atexit", "traceback", "warnings", "optparse", "getopt", "cmd", "shlex",
)


def docstring_sentences(modules: Sequence[str] = STDLIB_MODULES, min_words: int = 6, max_words: int = 60,
                        seed: int = 0) -> list[str]:
    """Unique English sentences from the docstrings of ``modules`` and their public members, shuffled."""
    texts: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        texts.append(mod.__doc__ or "")
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and getattr(obj, "__module__", name) == name:
                texts.append(doc)
    seen, out = set(), []
    for text in texts:
        flat = re.sub(r"\s+", " ", text)
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            sent = sent.strip()
            words = sent.split()
            if not (min_words <= len(words) <= max_words) or sent in seen:
                continue
            if not re.match(r"^[A-Z]", sent) or sum(c.isalpha() for c in sent) < 0.6 * len(sent):
                continue  # code samples, tables and signatures are not prose
            seen.add(sent)
            out.append(sent)
    random.Random(seed).shuffle(out)
    return out


def read_lines(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"text file not found: {p} (one text per line)")
    lines = [l.strip() for l in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [l for l in lines if l]
    if not lines:
        raise DataError(f"{p} holds no text lines")
    return lines


def load_tokenizer(path: str | os.PathLike):
    """A local Hugging Face tokenizer (a model folder or tokenizer.json's folder)."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"tokenizer not found: {p} (give the model folder holding tokenizer.json)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise DataError(f"cannot load a tokenizer from {p}: {type(e).__name__}: {first_line(e)}") from e


def tokenize(tokenizer, texts: Iterable[str], max_len: int = 128, pad_to: int | None = None) -> list[dict[str, np.ndarray]]:
    """One feed per text: input_ids and attention_mask [1, L] (natural length, or padded to ``pad_to``)."""
    feeds = []
    for t in texts:
        enc = tokenizer(t, truncation=True, max_length=pad_to or max_len, padding="max_length" if pad_to else False,
                        return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return feeds


def write_token_data(feeds: Sequence[dict[str, np.ndarray]], folder: str | os.PathLike) -> Path:
    """DATA as a folder of .npz feeds (variable lengths allowed)."""
    from edgecomp.data import save_npz

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        save_npz(out / f"{i:05d}.npz", f)
    return out
