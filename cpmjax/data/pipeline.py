"""grain pipelines: tokenize documents, pack them into fixed-length rows with segment ids and
positions, mix sources by weight, shuffle as a function of the seed, batch, and shard per host.

Packing concatenates ``<s> doc </s>`` sequences and cuts rows of ``seq_len + 1`` tokens; a document
longer than a row continues in the next row, where its positions start again at 0 (nothing is
dropped but the final partial row). In each row, ``segment_ids`` number the documents from 1 and
``positions`` restart at 0 for each of them; ``loss_mask`` is 0 where a target token belongs to another document, so no prediction
crosses a document boundary. Rows carry no padding, so every segment id is >= 1. The batch at
step s is a pure function of (seed, s); each epoch of a source is reshuffled (grain derives the
order from the seed and the epoch).

Resume: ``make_batch_iterator(...).get_state()`` is a small JSON-able dict; store it with the train
state (e.g. ``ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))``, or as JSON)
and ``set_state`` it on a fresh iterator built with the same arguments.

Every source is read, tokenized and packed in memory when the dataset is built (seconds for a few
MB); that is why there are no grain worker processes: row access is an array slice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from cpmjax.data.sources import DataError, SourceType, read_documents
from cpmjax.data.tokenizer import encode, load_tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: a file (or folder of .txt files), its format, and its mixture weight."""

    path: str
    type: SourceType = "jsonl"
    weight: float = 1.0
    text_field: str = "text"


def tokenize_documents(docs: Sequence[str], tokenizer_path: str) -> list[np.ndarray]:
    """``<s> doc </s>`` token ids per document, as MiniCPM frames its pretraining documents."""
    tok = load_tokenizer(tokenizer_path)
    return [np.asarray(encode(tok, d, add_bos=True, add_eos=True), np.int32) for d in docs]


def pack_rows(token_docs: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document index) arrays of shape [rows, seq_len + 1] from concatenated documents."""
    if not token_docs:
        raise ValueError("no documents to pack")
    stream = np.concatenate(token_docs)
    doc_ids = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(token_docs)])
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one row of {seq_len + 1}")
    n = rows * (seq_len + 1)
    return stream[:n].reshape(rows, -1), doc_ids[:n].reshape(rows, -1)


def segment_positions(seg: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 wherever the segment id of a row changes."""
    starts = np.r_[0, np.flatnonzero(seg[1:] != seg[:-1]) + 1]
    return (np.arange(len(seg)) - np.repeat(starts, np.diff(np.r_[starts, len(seg)]))
            ).astype(np.int32)


def row_example(tokens: np.ndarray, doc_ids: np.ndarray) -> Batch:
    """Model inputs of one packed row."""
    seg_full = np.cumsum(np.r_[1, doc_ids[1:] != doc_ids[:-1]]).astype(np.int32)
    seg = seg_full[:-1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg,
            "positions": segment_positions(seg),
            "loss_mask": (seg_full[1:] == seg).astype(np.float32)}


class PackedRows:
    """A random-access grain source over packed rows."""

    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray) -> None:
        self.tokens, self.doc_ids = tokens, doc_ids

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> Batch:
        return row_example(self.tokens[i], self.doc_ids[i])


def packed_dataset(source: Source, tokenizer_path: str, seq_len: int) -> grain.MapDataset:
    """Unshuffled packed rows of one source, in document order; a source too small for one row
    is a DataError naming it."""
    docs = read_documents(source.path, source.type, source.text_field)
    if not docs:
        raise DataError(f"data source {source.path} holds no documents (an empty file?)")
    try:
        rows = pack_rows(tokenize_documents(docs, tokenizer_path), seq_len)
    except ValueError as e:
        raise DataError(f"data source {source.path}: {e} (train.seq_len + 1); give it more "
                        "text or use a shorter train.seq_len") from e
    return grain.MapDataset.source(PackedRows(*rows))


def _host_slice(batch: Batch, shard_index: int, shard_count: int) -> Batch:
    """This host's contiguous block of the global batch (hosts agree on the global batch)."""
    per_host = len(batch["inputs"]) // shard_count
    return {k: v[shard_index * per_host:(shard_index + 1) * per_host] for k, v in batch.items()}


def make_batch_dataset(sources: Sequence[Source], tokenizer_path: str, seq_len: int,
                       global_batch_size: int, seed: int, shard_index: int = 0,
                       shard_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of this host's batches; element s is the batch of step s."""
    return batch_dataset([packed_dataset(s, tokenizer_path, seq_len) for s in sources],
                         [s.weight for s in sources], global_batch_size, seed, shard_index,
                         shard_count)


def batch_dataset(row_datasets: Sequence[grain.MapDataset], weights: Sequence[float],
                  global_batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of this host's batches from unshuffled row datasets: each shuffled
    (reshuffled every epoch) and repeated, mixed by weight, batched, sliced per host."""
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                         f"{shard_count} hosts")
    datasets = [rows.shuffle(seed=seed + i).repeat() for i, rows in enumerate(row_datasets)]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets,
                                                                     weights=list(weights))
    ds = ds.batch(global_batch_size)
    return ds.map(lambda b: _host_slice(b, shard_index, shard_count))


def make_batch_iterator(sources: Sequence[Source], tokenizer_path: str, seq_len: int,
                        global_batch_size: int, seed: int, shard_index: int = 0,
                        shard_count: int = 1) -> grain.DatasetIterator:
    """Iterator of batches with ``get_state()`` / ``set_state()`` for exact resume."""
    return iter(make_batch_dataset(sources, tokenizer_path, seq_len, global_batch_size, seed,
                                   shard_index, shard_count).to_iter_dataset())


def eval_batches(source: Source, tokenizer_path: str, seq_len: int, batch_size: int,
                 max_batches: int) -> list[Batch]:
    """A fixed, unshuffled list of held-out batches."""
    return fixed_batches(packed_dataset(source, tokenizer_path, seq_len), seq_len, batch_size,
                         max_batches, source.path)


def fixed_batches(rows: grain.MapDataset, seq_len: int, batch_size: int, max_batches: int,
                  name: str) -> list[Batch]:
    """The first ``max_batches`` full batches of ``rows`` (of ``seq_len + 1`` tokens) in order
    (``name`` is for errors)."""
    n = min(max_batches, len(rows) // batch_size)
    if n == 0:
        raise DataError(f"held-out set {name} has {len(rows)} packed rows of {seq_len + 1} "
                        f"tokens, fewer than one batch of {batch_size} (train.global_batch_size);"
                        " give it more text or use a smaller batch")
    return [rows.batch(batch_size)[i] for i in range(n)]


def unigram_loss(train_docs: Sequence[np.ndarray], eval_docs: Sequence[np.ndarray],
                 vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fitted on train, on eval tokens:
    the loss a model that ignores context would reach."""
    return unigram_token_loss(np.concatenate(train_docs),
                              np.concatenate([d[1:] for d in eval_docs]),  # bos: never a target
                              vocab_size)


def unigram_token_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray,
                       vocab_size: int) -> float:
    """:func:`unigram_loss` on flat token arrays (the tokens that are targets)."""
    counts = np.bincount(train_tokens, minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())

