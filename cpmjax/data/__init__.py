"""Data: the default corpus, the project's tokenizer, and grain pipelines."""

from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.pipeline import (Batch, Source, eval_batches, make_batch_dataset,
                                  make_batch_iterator, pack_rows, row_example, tokenize_documents,
                                  unigram_loss)
from cpmjax.data.sources import DataError, read_documents
from cpmjax.data.tokenizer import (BOS_ID, EOS_ID, SPECIAL_TOKENS, encode,
                                   get_or_build_default_tokenizer, load_tokenizer)

__all__ = ["BOS_ID", "Batch", "DataError", "EOS_ID", "SPECIAL_TOKENS", "Source",
           "build_default_corpus", "encode", "eval_batches", "get_or_build_default_tokenizer",
           "load_tokenizer", "make_batch_dataset", "make_batch_iterator", "pack_rows",
           "read_documents", "row_example", "tokenize_documents", "unigram_loss"]
