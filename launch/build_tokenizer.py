"""Train the project's byte-level BPE tokenizer:
``python launch/build_tokenizer.py --out=DIR [--vocab_size=4096] [--source=FILE --source_type=jsonl]``.

Without ``--source`` it trains on the default corpus (built once under ``--cache_dir`` from the
interpreter's own documentation). The output folder loads with ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.sources import DataError, read_documents
from cpmjax.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

flags.DEFINE_string("out", None, "output tokenizer folder", required=True)
flags.DEFINE_integer("vocab_size", 4096, "vocabulary size, special tokens included")
flags.DEFINE_string("source", None, "training text (default: the default corpus's train split)")
flags.DEFINE_enum("source_type", "jsonl", ["text", "jsonl", "arrayrecord"], "format of --source")
flags.DEFINE_string("text_field", "text", "JSONL field holding the text")
flags.DEFINE_string("cache_dir", ".cache/cpmjax", "where the default corpus is built and cached")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    source = f.source or str(build_default_corpus(f.cache_dir) / "train.jsonl")
    try:
        docs = read_documents(source, f.source_type if f.source else "jsonl", f.text_field)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = save_tokenizer(train_tokenizer(docs, f.vocab_size), f.out)
    print(f"wrote {out} (vocab {load_tokenizer(out).get_vocab_size()}, {len(docs)} documents)")
    return 0


if __name__ == "__main__":
    app.run(main)
