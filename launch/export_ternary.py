"""Export a ternary model: ``python launch/export_ternary.py --checkpoint=runs/bitcpm_tiny
--hf_out=out/bitcpm_hf --packed_out=out/bitcpm_packed``.

From a ternary QAT run (``configs/bitcpm_tiny.py``) the settings it trained with are used; any
other model (run dir, cpmjax checkpoint, HF folder) is rounded as it is ("plain rounding",
``--group_size`` and ``--targets``). ``--hf_out``: a fake-quantized HF MiniCPM folder (the
ternary values times their scales); ``--packed_out``: 2 bits per weight plus scales, which
``launch/serve.py --checkpoint=DIR`` and ``cpmjax.load`` serve (``cpmjax.quant.ternary``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

import cpmjax
from cpmjax.quant import ternary

flags.DEFINE_string("checkpoint", None, "QAT run, or any model to round", required=True)
flags.DEFINE_string("hf_out", None, "fake-quantized HF folder to write")
flags.DEFINE_string("packed_out", None, "packed ternary folder to write")
flags.DEFINE_integer("group_size", 128, "plain rounding: input rows per scale (-1 per channel, "
                     "0 per tensor); a QAT run's own setting wins")
flags.DEFINE_string("targets", ",".join(ternary.LINEARS), "plain rounding: ternary weights")
flags.DEFINE_bool("overwrite", False, "replace existing output folders")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    if not (f.hf_out or f.packed_out):
        raise app.UsageError("give --hf_out and/or --packed_out")
    run = Path(f.checkpoint)
    try:
        tc = ternary.ternary_config_of_run(run)
        print(f"{run} is a ternary QAT run: {tc}")
    except (FileNotFoundError, ValueError):
        tc = ternary.TernaryConfig.from_dict({"group_size": f.group_size, "targets": f.targets})
        print(f"plain rounding of {run}: {tc}")
    try:
        model = cpmjax.load(run)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = cpmjax.api.tokenizer_file(run, model.config.vocab_size)
    written = ternary.export_ternary(model.config, model.params, tc, hf_out=f.hf_out,
                                     packed_out=f.packed_out, tokenizer_file=tok,
                                     overwrite=f.overwrite)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
