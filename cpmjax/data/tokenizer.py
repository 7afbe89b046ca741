"""The project's own tokenizer: byte-level BPE trained on the default corpus in seconds.

Special token ids follow MiniCPM: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), then the chat
tokens MiniCPM4 uses. The saved folder loads offline with ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cpmjax.atomic import atomic_dir
from cpmjax.data.corpus import build_default_corpus

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over ``texts`` (deterministic for a given corpus)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | os.PathLike) -> Path:
    """Write tokenizer.json + HF config files atomically into ``folder``."""
    out = Path(folder)
    with atomic_dir(out) as tmp:
        _write_tokenizer_files(tok, tmp)
    return out


def _write_tokenizer_files(tok: Tokenizer, tmp: Path) -> None:
    from cpmjax.serve.chat import chat_template_text  # the MiniCPM4 chat format

    tok.save(str(tmp / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special,
              "additional_special_tokens": SPECIAL_TOKENS[3:],
              "chat_template": chat_template_text()}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a folder (or a tokenizer.json file)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    return Tokenizer.from_file(str(file))


def encode(tok: Tokenizer, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``; bos/eos are added here, not by the tokenizer, so callers choose."""
    ids = tok.encode(text, add_special_tokens=False).ids
    return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])


def _corpus_texts(corpus_dir: Path) -> Iterator[str]:
    """Training texts streamed from the corpus's train split (never the held-out one)."""
    with open(corpus_dir / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def get_or_build_default_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 4096) -> Path:
    """Folder of the tokenizer trained on the default corpus; built once per vocab size."""
    folder = Path(cache_dir) / f"tokenizer-{vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        corpus = build_default_corpus(cache_dir)
        save_tokenizer(train_tokenizer(_corpus_texts(corpus), vocab_size), folder)
    return folder
