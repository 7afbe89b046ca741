"""The flags the serving launchers share (model source, quantization, speculative draft), defined
when a launcher imports this module, and their values as ``cpmjax.serve.cli`` arguments."""

from __future__ import annotations

from absl import app, flags

from cpmjax.model.mtp import DRAFT_FORMS
from cpmjax.serve import cli

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF MiniCPM folder or cpmjax checkpoint")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "tokenizer folder/tokenizer.json (default: the checkpoint's own)")
PRESET = flags.DEFINE_string("random_preset", None,
                             "no checkpoint: random weights of this preset (e.g. tiny), for tests")
QUANTIZE = flags.DEFINE_enum("quantize", "none", list(cli.QUANTIZE),
                             "weight-only quantization of the target's decoder linears at load "
                             "(gptq/pgptq calibrate on the default corpus's train split)")
QUANT_BITS = flags.DEFINE_enum("quant_bits", "4", ["4", "8"], "bits per weight with --quantize")
QUANT_GROUP = flags.DEFINE_integer("quant_group", 128, "quantization group size (input dim)")
CALIB_ROWS = flags.DEFINE_integer("calib_rows", 32, "GPTQ calibration rows of 256 tokens")
DRAFT = flags.DEFINE_string("draft", None,
                            "speculative decoding: an EAGLE draft .safetensors (CPM.cu layout, "
                            "cpmjax.model.mtp.save_mtp) or a training run with an MTP head")
SPEC_K = flags.DEFINE_integer("spec_k", 3, "draft tokens per verify step (with --draft)")
DRAFT_QUANTIZE = flags.DEFINE_enum("draft_quantize", "none", ["none", "rtn"],
                                   "int4 RTN of the draft layer (only with a quantized target)")
DRAFT_FORM = flags.DEFINE_enum("draft_form", "auto", ["auto", *DRAFT_FORMS],
                               "the draft head's form (cpmjax.model.mtp.DRAFT_FORMS); auto: the "
                               "file's metadata (none: CPM.cu's) or the run's train.draft_form")
SPEC_TREE = flags.DEFINE_string(
    "spec_tree", None, "EAGLE-2 tree drafting (with --draft): depth,topk,size, e.g. 4,2,8 "
    "(--spec_k is then unused)")
SPEC_POLICY = flags.DEFINE_enum(
    "spec_policy", "measured", ["measured", "fixed"],
    "with --spec_tree: switch among tree, chain and plain steps by measured cost, or always tree")
FRSPEC = flags.DEFINE_string("frspec", None, "FR-Spec token ranking .npy (launch/build_frspec.py)")
FRSPEC_SIZE = flags.DEFINE_integer(
    "frspec_size", 0, "draft vocabulary: the N most frequent ids of --frspec (0 = all)")


def model_source() -> cli.ModelSource:
    return cli.ModelSource(CHECKPOINT.value, PRESET.value, TOKENIZER.value, QUANTIZE.value,
                           int(QUANT_BITS.value), QUANT_GROUP.value, CALIB_ROWS.value)


def draft_source() -> cli.DraftSource:
    given = frozenset(n for n in ("spec_k", "frspec", "frspec_size", "draft_quantize",
                                  "draft_form", "spec_tree", "spec_policy")
                      if flags.FLAGS[n].present)
    return cli.DraftSource(DRAFT.value, SPEC_K.value, DRAFT_QUANTIZE.value, FRSPEC.value,
                           FRSPEC_SIZE.value, given, DRAFT_FORM.value, SPEC_TREE.value,
                           SPEC_POLICY.value)


def load_model():
    """(config, params, tokenizer) from the flags; usage errors as absl usage errors."""
    try:
        return cli.load_model(model_source())
    except cli.UsageError as e:
        raise app.UsageError(str(e)) from None


def load_speculative(cfg):
    try:
        return cli.load_speculative(cfg, draft_source(), QUANTIZE.value != "none")
    except cli.UsageError as e:
        raise app.UsageError(str(e)) from None
