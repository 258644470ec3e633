"""Embedding reduction: count the user's tokens, then run the embedding passes in order.

    add tokens  ->  prune vocabulary  ->  factorize (optionally quantized)  or  quantize rows

The *vocabulary table* is the largest embedding table; corpus counts, pruning and added tokens
apply to it (its rows must match the tokenizer). Everything is computed in memory: a bad input
raises before any file is written, and the CLI writes the model (and, for ``--add-tokens`` or
``--remap-tokenizer``, a tokenizer folder beside it) only at the end.
"""


from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import StepData
from edgecomp.embeddings.add_tokens import AddTokensPass
from edgecomp.embeddings.factorize_embeddings import FactorizeEmbeddingsPass
from edgecomp.embeddings.options import ReduceOptions
from edgecomp.embeddings.prune_vocabulary import PruneVocabularyPass
from edgecomp.embeddings.quantize_embeddings import QuantizeEmbeddingsPass
from edgecomp.embeddings.tables import find_embedding_tables
from edgecomp.embeddings.tokenizer import (
    add_to_tokenizer,
    new_token_rows,
    remap_token_ids,
    token_counts,
    tokenizer_texts,
)
from edgecomp.errors import ConfigError, DataError, DataNeeded, OptionError, PassFailed
from edgecomp.measure.interface import keeps_interface
from edgecomp.passes.base import PassReport, run_pass
from edgecomp.step import StepContext, StepResult

__all__ = ["ReduceOptions", "ReduceResult", "reduce_embeddings", "run", "step_result"]


@dataclasses.dataclass
class ReduceResult:
    model: ir.Model
    reports: list[PassReport]
    summary: dict[str, Any]
    tokenizer_files: dict[str, str]  # file name -> text, for a tokenizer folder beside the model
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr



def reduce_embeddings(model: ir.Model, opts: ReduceOptions, tokenizer=None, corpus: Sequence[str] | None = None,
                      keep_ids: np.ndarray | None = None, new_tokens: Sequence[str] | None = None) -> ReduceResult:
    """Reduce ``model``'s embedding tables in place (see the module docstring)."""
    _check(opts, tokenizer, corpus, keep_ids, new_tokens)
    tables, skipped = find_embedding_tables(model, tied=True)
    if not tables:
        why = f" ({skipped[0]['table']}: {skipped[0]['reason']})" if skipped else ""
        raise PassFailed("no embedding table (a float initializer [V, D] read by Gather with run-time integer ids) "
                         f"in the model{why}; nothing to reduce")
    vocab = max(tables, key=lambda t: t.value.const_value.shape[0])
    table = vocab.array
    vocab_size = table.shape[0]
    if tokenizer is not None and len(tokenizer) != vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the table {vocab.value.name} has "
                        f"{vocab_size} rows; give the tokenizer the model was trained with")
    counts = token_counts(tokenizer, corpus, vocab_size) if corpus is not None else None
    unk = opts.unk_id if opts.unk_id is not None else (tokenizer.unk_token_id if tokenizer is not None else None)
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer is not None and (
        new_tokens or opts.remap_tokenizer) else None
    reports, summary = [], {"vocabulary table": vocab.value.name, "rows before": vocab_size}

    if new_tokens:
        rows = new_token_rows(tokenizer, table, new_tokens)
        reports.append(run_pass(AddTokensPass(rows=rows, vocab_size=vocab_size), model))
        add_to_tokenizer(tok_json, new_tokens, vocab_size)
        vocab_size += len(rows)
        if counts is not None:
            counts = np.concatenate([counts, np.zeros(len(rows), np.int64)])
        summary["added tokens"] = len(rows)

    if opts.prune_vocab:
        if unk is None:  # the unknown token's id comes from unk_id or the tokenizer
            raise OptionError("unk_id", "is needed to prune the vocabulary without a tokenizer")
        if not 0 <= unk < vocab_size:
            if opts.unk_id is not None:
                raise OptionError("unk_id", f"{unk} is outside the vocabulary [0, {vocab_size})")
            raise DataError(f"the tokenizer's unknown token id {unk} is outside the vocabulary [0, {vocab_size})")
        keep = np.zeros(vocab_size, bool)
        if counts is not None:
            keep |= counts > 0
        if keep_ids is not None:
            if len(keep_ids) and (keep_ids.min() < 0 or keep_ids.max() >= vocab_size):
                raise OptionError("keep_ids", f"holds ids outside the vocabulary [0, {vocab_size})")
            keep[keep_ids] = True
        if tokenizer is not None:
            keep[tokenizer.all_special_ids] = True
        keep[unk] = True
        keep[vocab_size - len(new_tokens or ()):] = True
        kept = np.flatnonzero(keep)
        report = run_pass(PruneVocabularyPass(keep=kept, vocab_size=vocab_size, unk_id=unk,
                                              remap=not opts.remap_tokenizer), model)
        reports.append(report)
        if report.modified:
            if tok_json is not None and opts.remap_tokenizer:
                index = np.full(vocab_size, -1, np.int64)
                index[kept] = np.arange(len(kept))
                remap_token_ids(tok_json, index)
            summary["kept rows"] = len(kept)
            if counts is not None:
                summary["corpus tokens mapped to unknown"] = int(counts[~keep].sum())
                counts = counts[kept]
            vocab_size = len(kept)

    if opts.rank is not None or opts.energy is not None:
        reports.append(run_pass(FactorizeEmbeddingsPass(
            rank=opts.rank, energy=opts.energy, counts=counts, power=opts.power, smoothing=opts.smoothing,
            exact_rows=opts.exact_rows, bits=opts.bits, block=opts.block, scale_dtype=_scale_dtype(opts),
            min_rows=vocab_size), model))
    elif opts.bits is not None:
        dim = table.shape[1]
        block = opts.block if opts.block is not None else None if opts.bits == 8 else next(
            (b for b in (64, 32) if dim % b == 0), dim)
        reports.append(run_pass(QuantizeEmbeddingsPass(bits=opts.bits, block=block, scale_dtype=_scale_dtype(opts),
                                                       min_rows=min(opts.min_rows, vocab_size), tied=True), model))
    files = tokenizer_texts(tokenizer, tok_json) if tok_json is not None else {}
    summary["bytes before"] = int(table.nbytes)
    return ReduceResult(model, reports, summary, files)



def _check(opts: ReduceOptions, tokenizer, corpus, keep_ids, new_tokens) -> None:
    opts.validate()
    if opts.bits is None and opts.rank is None and opts.energy is None and not opts.prune_vocab and not new_tokens:
        raise ConfigError("nothing to do: set bits, rank or energy, prune_vocab, or add tokens")
    if corpus is not None and tokenizer is None:
        raise DataNeeded("tokenizer", "text")  # the corpus is counted in the model's tokens
    if new_tokens and tokenizer is None:
        raise DataNeeded("tokenizer", "adding tokens")
    if opts.prune_vocab and corpus is None and keep_ids is None:
        raise DataNeeded("text", "prune_vocab", option="prune_vocab")
    if opts.remap_tokenizer and (not opts.prune_vocab or tokenizer is None):
        raise OptionError("remap_tokenizer", "goes with prune_vocab and a tokenizer")
    if tokenizer is not None and (new_tokens or opts.remap_tokenizer):
        kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
        if opts.remap_tokenizer and kind not in ("WordPiece", "WordLevel"):
            raise OptionError("remap_tokenizer", f"supports WordPiece and WordLevel vocabularies, not {kind}; leave it "
                              "out to remap ids in the graph")


def _scale_dtype(opts: ReduceOptions) -> str:
    return opts.scale_dtype or ("float16" if opts.bits == 4 else "float32")


@keeps_interface("reduce-embeddings", same_ids=lambda opts, context=None, keep_ids=None, new_tokens=None: not (
    opts.prune_vocab or new_tokens))
def run(model: ir.Model, opts: ReduceOptions, data: StepData, context: StepContext | None = None, *,
        keep_ids: np.ndarray | None = None, new_tokens: Sequence[str] | None = None) -> StepResult:
    """What ``edgecomp reduce-embeddings`` and a recipe's reduce-embeddings step call: the corpus
    is ``data.text`` (one text a line), read with the tokenizer folder ``data.tokenizer``."""
    from edgecomp.passes.float_precision import in_float32, refuse_unrunnable_floats
    from edgecomp.text import load_tokenizer, read_lines

    refuse_unrunnable_floats(model)
    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else None
    corpus = read_lines(data.text) if data.text else None
    # a float16 model is reduced in float32 (factors, scales) and keeps its float16 interface and weights
    return step_result(in_float32(model, lambda m: reduce_embeddings(m, opts, tokenizer, corpus, keep_ids=keep_ids,
                                                                     new_tokens=new_tokens)))


def step_result(result: ReduceResult) -> StepResult:
    """``result`` in the shape every capability returns: one table per pass that changed rows,
    each pass's record as evidence, the tokenizer folder's files to write beside the model."""
    return StepResult("reduce-embeddings", result.model, result.summary,
                      {r.name: r.rows for r in result.reports if r.rows}, result.warnings,
                      {"passes": [r.to_json() for r in result.reports]}, files=result.tokenizer_files)
