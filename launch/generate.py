"""Generate a continuation of one prompt through the serving engine.

    python launch/generate.py --checkpoint runs/tiny --prompt "Hello" --max_new_tokens 32
    python launch/generate.py --random_preset tiny --prompt_ids 1,5,6 --temperature 0.8
    python launch/generate.py --checkpoint runs/tiny --prompt "Hello" \
        --draft runs/tiny_draft/draft.safetensors --spec_k 3   # prints the mean accept length
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

import model_flags
from cpmjax.serve.chat import apply_chat_template
from cpmjax.serve.generate import run_requests
from cpmjax.serve.sampling import SamplingParams

_PROMPT = flags.DEFINE_string("prompt", None, "prompt text (needs a tokenizer)")
_IDS = flags.DEFINE_list("prompt_ids", None, "prompt as comma-separated token ids")
_CHAT = flags.DEFINE_bool("chat", False, "wrap --prompt in the MiniCPM4 chat template")
_THINK = flags.DEFINE_bool("enable_thinking", True, "with --chat: allow a thinking block")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "HF semantics; ~1.1 avoids loops")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv: list[str]) -> None:
    del argv
    from cpmjax.data.tokenizer import encode

    try:  # before loading anything: a bad setting is a usage error naming the flag
        sampling = SamplingParams(_TEMP.value, _TOP_K.value, _TOP_P.value, _REP.value,
                                  _SEED.value)
        if _MAX_NEW.value < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {_MAX_NEW.value}")
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    cfg, params, tok = model_flags.load_model()
    if (_PROMPT.value is None) == (_IDS.value is None):
        raise app.UsageError("give exactly one of --prompt and --prompt_ids")
    if _IDS.value is not None:
        ids = [int(x) for x in _IDS.value]
    else:
        if tok is None:
            raise app.UsageError("--prompt needs a tokenizer (--tokenizer)")
        text = apply_chat_template([{"role": "user", "content": _PROMPT.value}],
                                   enable_thinking=_THINK.value) if _CHAT.value else _PROMPT.value
        ids = encode(tok, text)
    stops = [tok.token_to_id("<|im_end|>")] if tok is not None and _CHAT.value else None
    spec = model_flags.load_speculative(cfg)
    t = time.perf_counter()
    req = run_requests(cfg, params, [ids], _MAX_NEW.value, [sampling], stops, spec)[0]
    dt = time.perf_counter() - t
    out = req.output
    print(tok.decode(out, skip_special_tokens=True) if tok is not None else out)
    print(f"[{len(out)} tokens in {dt:.2f} s, compilation included]", file=sys.stderr)
    if spec is not None:  # CPM.cu prints the same figure after a run
        drafting = f"k={spec.k}" if spec.tree is None else f"tree={tuple(spec.tree)}"
        print(f"[mean accept length {req.mean_accept_length:.2f} over {req.decode_steps} "
              f"verify steps, {drafting}]", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
