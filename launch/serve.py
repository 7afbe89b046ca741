"""OpenAI-compatible server on 127.0.0.1 (use --host 0.0.0.0 deliberately to expose it).

    python launch/serve.py --checkpoint runs/tiny --port 8000
    curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}' \
         -H 'content-type: application/json'
    python launch/serve.py --checkpoint runs/tiny --draft runs/tiny_draft/draft.safetensors \
         --spec_k 3 --frspec freq.npy --frspec_size 1024    # speculative; /metrics shows
                                                            # mean_accept_length
    python launch/serve.py --checkpoint runs/tiny --quantize pgptq --quant_bits 4
"""

from __future__ import annotations


import uvicorn
from absl import app, flags

import model_flags
from cpmjax.serve.http_errors import DEFAULT_MAX_BODY_BYTES
from cpmjax.serve.server import create_app, make_scheduler

_HOST = flags.DEFINE_string("host", "127.0.0.1", "bind address")
_PORT = flags.DEFINE_integer("port", 8000, "port")
_NAME = flags.DEFINE_string("model_name", "cpmjax", "name reported by /v1/models")
_SLOTS = flags.DEFINE_integer("max_slots", 8, "concurrent decode slots (static batch)")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "context per slot (prompt + output)")
_CHUNK = flags.DEFINE_integer("chunk", 128, "prefill chunk length")
_QUEUE = flags.DEFINE_integer("max_queue", 64, "waiting requests before 429")
_LOGPROBS = flags.DEFINE_enum("logprobs_mode", "raw", ["raw", "processed"],
                              "logprobs: the model's log-softmax (raw, vLLM's default) or the "
                              "distribution sampled from (after penalties, temperature, top-k/p)")
_BODY = flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES,
                             "larger request bodies are refused with 413")


def main(argv: list[str]) -> None:
    del argv
    cfg, params, tok = model_flags.load_model()
    sched = make_scheduler(cfg, params, tok, max_slots=_SLOTS.value,
                           max_len=min(_MAX_LEN.value, cfg.max_position_embeddings),
                           chunk=_CHUNK.value, max_queue=_QUEUE.value,
                           speculative=model_flags.load_speculative(cfg),
                           logprobs_mode=_LOGPROBS.value)
    try:
        uvicorn.run(create_app(sched, tok, _NAME.value, max_body_bytes=_BODY.value), host=_HOST.value, port=_PORT.value)
    finally:
        sched.stop()


if __name__ == "__main__":
    app.run(main)
