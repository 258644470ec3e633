"""Tokenizer side of embedding reduction: corpus token counts, rows for new tokens, and the
rewritten tokenizer.json when the vocabulary is pruned or grown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgecomp.errors import DataError, OptionError

__all__ = ["token_counts", "new_token_rows", "read_ids", "write_tokenizer"]


def token_counts(tokenizer, lines: Sequence[str], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in ``lines`` (special tokens included, as the model sees them)."""
    counts = np.zeros(vocab_size, np.int64)
    special = set(tokenizer.all_special_ids)
    ordinary = 0
    for ids in tokenizer(list(lines), truncation=False)["input_ids"]:
        ids = np.asarray(ids, np.int64)
        np.add.at(counts, ids, 1)
        ordinary += sum(1 for i in ids if int(i) not in special)
    if ordinary == 0:
        raise DataError("the corpus produces no tokens besides special ones; give text in the model's language, "
                        "one text per line")
    return counts



def new_token_rows(tokenizer, table: np.ndarray, words: Sequence[str]) -> np.ndarray:
    """Each new word's row: the mean of its sub-token rows under the original vocabulary."""
    rows = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise OptionError("add_tokens", f"holds {w!r}, which tokenizes to nothing; remove it")
        rows.append(table[np.asarray(ids)].mean(0))
    return np.stack(rows).astype(table.dtype)



def read_ids(path: str | os.PathLike) -> np.ndarray:
    """Token ids from a text file: integers separated by whitespace or commas."""
    from edgecomp.text import read_lines

    try:
        return np.array([int(x) for line in read_lines(path) for x in line.replace(",", " ").split()], np.int64)
    except ValueError as e:
        raise DataError(f"{path} must hold integer token ids separated by spaces, commas or newlines ({e})") from e



def add_to_tokenizer(j: dict, words: Sequence[str], first_id: int) -> None:
    j.setdefault("added_tokens", [])
    for i, w in enumerate(words):
        j["added_tokens"].append({"id": first_id + i, "content": w, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": True, "special": False})



def remap_token_ids(j: dict, index: np.ndarray) -> None:
    """Renumber a tokenizer.json to the kept ids (``index``: old id -> new id or -1)."""
    model = j["model"]
    model["vocab"] = {t: int(index[i]) for t, i in model["vocab"].items() if index[i] >= 0}
    j["added_tokens"] = [dict(a, id=int(index[a["id"]])) for a in j.get("added_tokens") or [] if index[a["id"]] >= 0]

    def walk(pp: dict | None) -> None:
        if not pp:
            return
        for sub in pp.get("processors") or []:
            walk(sub)
        for spec in (pp.get("special_tokens") or {}).values():
            spec["ids"] = [int(index[i]) for i in spec["ids"]]
        for key in ("sep", "cls"):
            if key in pp:
                pp[key] = [pp[key][0], int(index[pp[key][1]])]

    walk(j.get("post_processor"))



def tokenizer_texts(tokenizer, j: dict) -> dict[str, str]:
    files = {"tokenizer.json": json.dumps(j, ensure_ascii=False, indent=1)}
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    files["tokenizer_config.json"] = json.dumps({**special, "model_max_length": tokenizer.model_max_length}, indent=1)
    if j["model"]["type"] == "WordPiece":
        vocab = {i: t for t, i in j["model"]["vocab"].items()}
        vocab.update({a["id"]: a["content"] for a in j.get("added_tokens") or []})
        files["vocab.txt"] = "".join(vocab[i] + "\n" for i in sorted(vocab))
    return files



def write_tokenizer(files: dict[str, str], folder: str | os.PathLike) -> Path:
    """Write the tokenizer folder (each file atomically)."""
    from edgecomp.io import write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text(out / name, text)
    return out
