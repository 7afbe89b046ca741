"""Convert checkpoints: ``python launch/convert.py --src=DIR --dst=DIR --format=hf|llama|cpmjax``.

``--src`` is an HF MiniCPM folder or a cpmjax checkpoint (anything ``cpmjax.load`` accepts).
``hf`` writes the MiniCPM layout (trust_remote_code), ``llama`` a LlamaForCausalLM folder with the
muP scales folded into the weights, ``cpmjax`` an orbax checkpoint; each carries the source's
tokenizer. Nothing existing is overwritten unless ``--overwrite``, and even then only a folder that
a previous export wrote (its ``cpmjax_export.json`` lists every file in it) and never one that
contains ``--src``.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
from absl import app, flags

import cpmjax
from cpmjax.config import ConfigError
from cpmjax.convert import CheckpointError
from cpmjax.convert.export_dir import check_destination

flags.DEFINE_string("src", None, "HF MiniCPM folder or cpmjax checkpoint", required=True)
flags.DEFINE_string("dst", None, "output folder", required=True)
flags.DEFINE_enum("format", "hf", ["hf", "llama", "cpmjax"], "output format")
flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors shard (hf / llama)")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "output dtype (default: the config's torch_dtype)")
flags.DEFINE_bool("overwrite", False, "replace --dst if it holds a previous export (and only then)")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    load_dtype = jnp.float32 if f.dtype in (None, "float32") else jnp.dtype(f.dtype)
    try:
        check_destination(f.dst, f.overwrite, [f.src])  # before the (slow) load
        model = cpmjax.load(f.src, dtype=load_dtype)
        if f.format == "cpmjax":
            from cpmjax.train.checkpoint import save_model

            out = save_model(model.config, model.params, f.dst, overwrite=f.overwrite,
                             tokenizer=model.tokenizer_path, sources=[f.src])
        else:
            out = cpmjax.save_hf(model, f.dst, format="minicpm" if f.format == "hf" else "llama",
                                 max_shard_size=f.max_shard_size, dtype=f.dtype,
                                 overwrite=f.overwrite)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {f.format} checkpoint to {out}")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
