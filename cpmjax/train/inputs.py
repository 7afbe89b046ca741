"""What a training run reads: its tokenizer, the batch iterator, fixed held-out batches and the
unigram baseline, from ``cfg.data``.

``data.format="text"`` (pretraining): documents packed into rows, every token a target.
``data.format="chat"`` (SFT, :mod:`cpmjax.posttrain.sft`): conversations packed whole, only the
assistant's tokens are targets, so ``eval_loss`` is the held-out assistant-token loss; without
``data.train_files`` the project's instruction set (:mod:`cpmjax.posttrain.tasks`) is built in
``data.cache_dir`` and used (train split to train, held-out split to evaluate).
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections

from cpmjax.config import ConfigError
from cpmjax.data import (Batch, Source, get_or_build_default_tokenizer, load_tokenizer,
                         make_batch_iterator, read_documents, tokenize_documents, unigram_loss)
from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.pipeline import batch_dataset, eval_batches, fixed_batches

@dataclasses.dataclass
class TrainInputs:
    tokenizer: str
    iterator: grain.DatasetIterator  # get_state / set_state for exact resume
    evals: list[Batch]
    baseline: float  # held-out loss of a unigram model: what ignoring context reaches


def _files(d: ml_collections.ConfigDict) -> tuple[list[str], list[float]]:
    """Train files and their mixture weights (checked by ``check_experiment``)."""
    files = [f.strip() for f in d.train_files.split(",") if f.strip()]
    weights = [float(w) for w in d.weights.split(",")] if d.weights else [1.0] * len(files)
    return files, weights


def _tokenizer(d: ml_collections.ConfigDict, vocab_size: int) -> str:
    tokenizer = d.tokenizer or str(get_or_build_default_tokenizer(d.cache_dir, vocab_size))
    tok_vocab = load_tokenizer(tokenizer).get_vocab_size()
    if tok_vocab > vocab_size:
        raise ConfigError(f"config field 'model.vocab_size': {vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({tok_vocab}) at {tokenizer}")
    return tokenizer


def make_inputs(cfg: ml_collections.ConfigDict, vocab_size: int, shard_index: int = 0,
                shard_count: int = 1) -> TrainInputs:
    """The run's inputs for this host (``shard_index`` of ``shard_count``); ``cfg`` has passed
    :func:`cpmjax.train.experiment.check_experiment`."""
    build = _chat_inputs if cfg.data.format == "chat" else _text_inputs
    return build(cfg, vocab_size, shard_index, shard_count)


def _text_inputs(cfg: ml_collections.ConfigDict, vocab_size: int, shard_index: int,
                 shard_count: int) -> TrainInputs:
    d, t = cfg.data, cfg.train
    if d.train_files:
        files, weights = _files(d)
        sources = [Source(f, d.source_type, w) for f, w in zip(files, weights)]
        valid = Source(d.valid_file or files[0], d.source_type)
    else:
        corpus = build_default_corpus(d.cache_dir)
        sources = [Source(str(corpus / "train.jsonl"))]
        valid = Source(str(corpus / "valid.jsonl"))
    tokenizer = _tokenizer(d, vocab_size)
    iterator = make_batch_iterator(sources, tokenizer, t.seq_len, t.global_batch_size, t.seed,
                                   shard_index, shard_count)
    evals = eval_batches(valid, tokenizer, t.seq_len, t.global_batch_size, t.eval_batches)
    docs = lambda s: tokenize_documents(read_documents(s.path, s.type), tokenizer)
    return TrainInputs(tokenizer, iterator, evals,
                       unigram_loss(docs(sources[0]), docs(valid), vocab_size))


def _chat_inputs(cfg: ml_collections.ConfigDict, vocab_size: int, shard_index: int,
                 shard_count: int) -> TrainInputs:
    from cpmjax.posttrain import sft, tasks  # post-training pulls in the serving template

    d, t = cfg.data, cfg.train
    long = d.long_conversations
    if d.train_files:
        files, weights = _files(d)
        valid = d.valid_file or files[0]
    else:
        folder = tasks.build_instruct_set(d.cache_dir,
                                          families=tasks.parse_families(d.instruct_families))
        files, weights, valid = [str(folder / "train.jsonl")], [1.0], str(folder / "heldout.jsonl")
    tokenizer = _tokenizer(d, vocab_size)
    built = [sft.chat_dataset(f, tokenizer, t.seq_len, long, t.seed) for f in files]
    for f, (_, _, stats) in zip(files, built):
        print(f"chat data {f}: {stats.conversations} conversations in {stats.rows} rows "
              f"({stats.fill:.0%} filled, {stats.assistant_tokens} assistant tokens; "
              f"{stats.truncated} truncated, {stats.dropped} dropped)", flush=True)
    iterator = iter(batch_dataset([ds for ds, _, _ in built], weights, t.global_batch_size,
                                  t.seed, shard_index, shard_count).to_iter_dataset())
    held_ds, held_rows, _ = sft.chat_dataset(valid, tokenizer, t.seq_len, long, t.seed)
    evals = fixed_batches(held_ds, t.seq_len, t.global_batch_size, t.eval_batches, valid)
    return TrainInputs(tokenizer, iterator, evals,
                       sft.assistant_unigram_loss(built[0][1], held_rows, vocab_size))
