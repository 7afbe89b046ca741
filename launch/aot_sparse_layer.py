"""Compile one InfLLM v2 decoder layer at a preset's real shapes for a TPU chip, on this CPU host.

``python launch/aot_sparse_layer.py --preset=minicpm4_8b --mode=train --seq_len=32768 --docs=5``
(forward + backward on a packed row) or ``--mode=decode --seq_len=131072 --batch=8`` (one decode
step into a KV cache of that length). Needs ``libtpu``; nothing is allocated. Prints one JSON
line (per-chip memory, FLOPs, bytes, Pallas kernel count, cache-sized layout copies) and appends
it to ``--out`` if given. Whole-model, multi-chip rows: ``launch/aot_compile.py``.
"""
from __future__ import annotations

import importlib.metadata
import json
import time

import jax
from absl import app, flags

from cpmjax.config import ModelConfig
from cpmjax.presets import MINICPM4_SPARSE, PRESETS
from cpmjax.sparse import scale_check

_PRESET = flags.DEFINE_enum("preset", "minicpm4_8b", list(PRESETS), "model preset")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology (one chip is used)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "decode"], "what to compile")
_SEQ = flags.DEFINE_integer("seq_len", 32768, "row length (train) or cache length (decode)")
_DOCS = flags.DEFINE_integer("docs", 5, "documents packed in the training row")
_BATCH = flags.DEFINE_integer("batch", 1, "decode slots")
_OUT = flags.DEFINE_string("out", None, "JSON-lines file to append the row to")
_ADD = flags.DEFINE_bool("add_sparse", True, "give a preset without a sparse_config MiniCPM4's "
                         "(the MiniCPM README's, presets.MINICPM4_SPARSE)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    hf = PRESETS[_PRESET.value]()
    added = hf.get("sparse_config") is None
    if added and not _ADD.value:
        raise app.UsageError(f"--preset={_PRESET.value} has no sparse_config "
                             "(--add_sparse adds MiniCPM4's)")
    cfg = ModelConfig.from_hf_config({**hf, "sparse_config": hf.get("sparse_config")
                                      or dict(MINICPM4_SPARSE)})
    t0 = time.time()
    if _MODE.value == "train":
        compiled = scale_check.compile_train_layer(cfg, _TOPOLOGY.value, _SEQ.value, _DOCS.value)
        cache = None
    else:
        compiled = scale_check.compile_decode_layer(cfg, _TOPOLOGY.value, _SEQ.value,
                                                    _BATCH.value)
        cache = _BATCH.value * _SEQ.value * cfg.num_key_value_heads * cfg.head_dim
    row = {"tool": "launch/aot_sparse_layer.py",
           "host": f"cpu (libtpu {importlib.metadata.version('libtpu')}, jax {jax.__version__})",
           "preset": _PRESET.value, "topology": _TOPOLOGY.value, "chips": 1, "mode": _MODE.value,
           "seq_len": _SEQ.value, **({"docs": _DOCS.value} if cache is None
                                     else {"batch": _BATCH.value}),
           "sparse_config": "MINICPM4_SPARSE (added)" if added else "preset's",
           "dense_len": cfg.sparse_config.dense_len, "compute_dtype": "bfloat16",
           "compile_s": round(time.time() - t0, 1), **scale_check.figures(compiled, cache)}
    line = json.dumps(row)
    print(line)
    if _OUT.value:
        with open(_OUT.value, "a") as f:  # appending one line; nothing to keep atomic
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
