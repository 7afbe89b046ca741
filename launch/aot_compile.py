"""Compile a step for a TPU topology on a CPU machine; print per-device memory, Pallas kernels,
FLOPs and bytes, and optionally append the row to a JSON-lines file.

    python launch/aot_compile.py --preset=minicpm4_0p5b --topology=v5p:2x2x1 --mesh=1,4,1 \\
        --seq_len=32768 --batch=4 --sparse=on --out=bench/results/aot_compile_tpu.jsonl
    python launch/aot_compile.py --step=prefill --preset=minicpm4_8b_128k --topology=v5p:2x2x1 \\
        --seq_len=131072 --chunk=2048
    python launch/aot_compile.py --step=decode --preset=minicpm4_8b_128k --seq_len=131072
    python launch/aot_compile.py --step=tree --preset=minicpm4_8b --seq_len=8192 --tree=4,4,16

``--step``: ``train`` (the sharded train step on the whole mesh), ``prefill`` (the serving
engine's last prefill chunk of a ``seq_len``-token prompt), ``decode`` (one engine decode step
over a ``seq_len``-token cache) or ``tree`` (one round of the tree speculative engine over that
cache: EAGLE-2 draft tree of ``--tree``, tree-masked verify, acceptance, KV compaction); the
serving steps run on ``--num_devices`` chips (default 1) and also count cache-sized copies.
Needs ``libtpu`` (the TPU compiler); the library is ``cpmjax.parallel.aot``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
from typing import Any

import jax
from absl import app, flags

from cpmjax.config import ModelConfig
from cpmjax.model.mtp import DRAFT_FORMS
from cpmjax.parallel import aot
from cpmjax.presets import model_config
from cpmjax.serve.cli import UsageError, parse_tree_shape
from cpmjax.train.experiment import experiment_config

_PRESET = flags.DEFINE_string("preset", "minicpm4_0p5b", "model preset (cpmjax.presets)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology name, e.g. v5p:2x2x1")
_STEP = flags.DEFINE_enum("step", "train", ["train", "prefill", "decode", "tree"],
                          "what to compile")
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "data,fsdp,tensor (-1 fills; train)")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "sequence / prompt / cache length")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (train; 0 = one row per device) or "
                              "decode slots (decode; 0 = 1)")
_TREE = flags.DEFINE_string("tree", "4,4,16", "tree step: depth,topk,size (as --spec_tree)")
_FRSPEC = flags.DEFINE_integer("frspec_size", aot.FRSPEC_SIZE,
                               "tree step: FR-Spec ids of the draft head (0: full vocabulary)")
_GREEDY = flags.DEFINE_bool("all_greedy", False, "tree step: every row greedy (no sampling)")
_DRAFT_FORM = flags.DEFINE_enum("draft_form", "mtp", list(DRAFT_FORMS),
                                "tree step: how the draft head meets the target (cpmcu: "
                                "CPM.cu's EAGLE head)")
_CHUNK = flags.DEFINE_integer("chunk", 2048, "prefill chunk (CPM.cu's default chunk_length)")
_DEVICES = flags.DEFINE_integer("num_devices", 1, "chips for the serving steps")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"], "remat")
_SPARSE = flags.DEFINE_enum("sparse", "preset", ["preset", "on", "off"],
                            "InfLLM v2: as the preset has it, on (MiniCPM4's sparse_config) or off")
_DENSE_LEN = flags.DEFINE_integer("dense_len", None, "override sparse_config.dense_len")
_ATTN = flags.DEFINE_string("attention_impl", "auto", "dense attention kernel")
_SPARSE_IMPL = flags.DEFINE_string("sparse_attention_impl", "auto", "InfLLM v2 kernel")
_OUT = flags.DEFINE_string("out", "", "append the result as one JSON line to this file")
_TAG = flags.DEFINE_string("tag", None,
                           "recorded as the row's 'sweep' (launch/aot_memory_sweep.py)")


def _append(row: dict) -> None:
    print(json.dumps(row))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if len(_MESH.value) != 3:
        raise app.UsageError(f"--mesh needs data,fsdp,tensor, got {_MESH.value}")
    dump_dir = aot.enable_hlo_dump()  # before any backend starts
    cfg = model_config(_PRESET.value, sparse=_SPARSE.value, dense_len=_DENSE_LEN.value)
    kernels = dict(attn_impl=_ATTN.value, sparse_impl=_SPARSE_IMPL.value)
    row = {"tool": "launch/aot_compile.py", "step": _STEP.value, "preset": _PRESET.value,
           "sparse": cfg.sparse_config is not None, "topology": _TOPOLOGY.value,
           "seq_len": _SEQ.value, "attention_impl": _ATTN.value,
           "sparse_attention_impl": _SPARSE_IMPL.value}
    if cfg.sparse_config is not None:
        row["dense_len"] = cfg.sparse_config.dense_len
    if _TAG.value:
        row["sweep"] = _TAG.value
    row.update(host=f"cpu (libtpu {importlib.metadata.version('libtpu')}, jax {jax.__version__})",
               time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        compiled = _compile(cfg, row, kernels)
    except Exception as e:  # the compiler's refusal is a result: record it
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        shutil.rmtree(dump_dir, ignore_errors=True)
        row.update(fits=False, error=str(e).strip().splitlines()[0][:500])
        _append(row)
        raise SystemExit(1)
    serving = _STEP.value != "train"
    cache = aot.cache_shapes(cfg, _SEQ.value, row["batch"]) if serving else None
    row.update(fits=True, **aot.report(compiled, _TOPOLOGY.value, dump_dir, cache))
    _append(row)


def _compile(cfg: ModelConfig, row: dict[str, Any], kernels: dict[str, str]) -> Any:
    """Compile the chosen step; fills in the row's shape fields."""
    if _STEP.value == "train":
        mesh = aot.tpu_mesh(_TOPOLOGY.value, tuple(int(x) for x in _MESH.value))
        batch = _BATCH.value or aot.devices_used(mesh)
        row.update(batch=batch, remat=_REMAT.value, compute_dtype="bfloat16",
                   mesh=aot.mesh_label(mesh))
        compiled = aot.compile_train_step(cfg, experiment_config({}, _PRESET.value).train, mesh,
                                          _SEQ.value, batch, _REMAT.value, **kernels)
    else:
        mesh = aot.tpu_mesh(_TOPOLOGY.value, (1, -1, 1), _DEVICES.value)
        row["mesh"] = aot.mesh_label(mesh)
        if _STEP.value == "prefill":
            compiled = aot.compile_prefill_chunk(cfg, mesh, _SEQ.value, _CHUNK.value, **kernels)
            row.update(batch=1, chunk=_CHUNK.value)
        elif _STEP.value == "decode":
            batch = _BATCH.value or 1
            compiled = aot.compile_decode_step(cfg, mesh, _SEQ.value, batch, **kernels)
            row.update(batch=batch)
        else:
            compiled = _compile_tree(cfg, mesh, row, kernels)
        row["dtype"] = "bfloat16"
    return compiled


def _compile_tree(cfg: ModelConfig, mesh: Any, row: dict[str, Any], kernels: dict[str, str]
                  ) -> Any:
    try:
        tree = parse_tree_shape(_TREE.value, "tree")
    except UsageError as e:
        raise app.UsageError(str(e)) from None
    batch = _BATCH.value or 1
    row.update(batch=batch, tree=list(tree), frspec_size=_FRSPEC.value or None,
               all_greedy=_GREEDY.value, draft_form=_DRAFT_FORM.value)
    return aot.compile_tree_step(cfg, mesh, _SEQ.value, batch, tree, _FRSPEC.value or None,
                                 _GREEDY.value, draft_form=_DRAFT_FORM.value, **kernels)


if __name__ == "__main__":
    app.run(main)
