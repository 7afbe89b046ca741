"""Build the FR-Spec draft vocabulary from corpus token frequencies (FR-Spec, arXiv 2502.14856):
``python launch/build_frspec.py --out=freq.npy --size=N [--tokenizer=DIR] [--source=FILE]``.

Without ``--source`` it counts the default corpus's train split; without ``--tokenizer`` it uses
the project tokenizer of the default corpus. EOS ids (``--eos``) are always included.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.pipeline import tokenize_documents
from cpmjax.data.sources import DataError, read_documents
from cpmjax.data.tokenizer import EOS_ID, get_or_build_default_tokenizer, load_tokenizer
from cpmjax.serve.frspec import coverage, save_frspec, token_counts, top_tokens

flags.DEFINE_string("out", None, "output .npy of token ids (a .json summary is written beside)",
                    required=True)
flags.DEFINE_integer("size", 32768, "number of draft-head rows (CPM.cu: 32768 of 73448)")
flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: the default corpus's)")
flags.DEFINE_string("source", None, "text to count (default: the default corpus's train split)")
flags.DEFINE_enum("source_type", "jsonl", ["text", "jsonl", "arrayrecord"], "format of --source")
flags.DEFINE_list("eos", [str(EOS_ID)], "token ids always included")
flags.DEFINE_string("cache_dir", ".cache/cpmjax", "where the default corpus is built and cached")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    tok_path = f.tokenizer or str(get_or_build_default_tokenizer(f.cache_dir))
    source = f.source or str(build_default_corpus(f.cache_dir) / "train.jsonl")
    try:
        docs = read_documents(source, f.source_type if f.source else "jsonl")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab = load_tokenizer(tok_path).get_vocab_size()
    counts = token_counts(tokenize_documents(docs, tok_path), vocab)
    try:
        ids = top_tokens(counts, f.size, [int(e) for e in f.eos])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cov = coverage(counts, ids)
    save_frspec(ids, f.out, {"vocab_size": vocab, "coverage": cov, "source": source,
                             "tokenizer": tok_path, "forced": [int(e) for e in f.eos]})
    print(f"wrote {f.out}: {len(ids)} of {vocab} ids cover {cov:.1%} of {int(counts.sum())} tokens")
    return 0


if __name__ == "__main__":
    app.run(main)
