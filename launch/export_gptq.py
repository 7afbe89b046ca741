"""Export a weight-only quantized model as a GPTQ checkpoint folder (vLLM's ``gptq`` /
``gptq_marlin`` layout; ``cpmjax.quant.gptq_export``)::

    python launch/export_gptq.py --checkpoint=runs/tiny --quantize=pgptq --out=out/tiny_gptq

``--quantize`` (rtn | gptq | pgptq), ``--quant_bits`` (4 | 8), ``--quant_group`` and
``--calib_rows`` are the serving launchers' flags (``launch/model_flags.py``); GPTQ and P-GPTQ
calibrate on the project corpus, streaming layer by layer.
"""

from __future__ import annotations

from absl import app, flags

import model_flags
import cpmjax
from cpmjax.quant.gptq_export import save_gptq

flags.DEFINE_string("out", None, "GPTQ folder to write", required=True)
flags.DEFINE_bool("overwrite", False, "replace a previous export in --out")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.quantize == "none":
        raise app.UsageError("give --quantize=rtn|gptq|pgptq (what to export)")
    cfg, params, _ = model_flags.load_model()
    tok = f.tokenizer or (cpmjax.api.tokenizer_file(f.checkpoint, cfg.vocab_size)
                          if f.checkpoint else None)
    out = save_gptq(cfg, params, f.out, overwrite=f.overwrite, tokenizer=tok)
    print(f"wrote GPTQ checkpoint ({f.quantize}, {f.quant_bits} bits, group {f.quant_group}): "
          f"{out}")


if __name__ == "__main__":
    app.run(main)
