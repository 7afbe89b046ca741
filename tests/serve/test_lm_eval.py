"""lm-eval (EleutherAI's harness) end to end against the server on 127.0.0.1: ``local-completions``
scores the shipped multiple-choice task by loglikelihood (echo + logprobs), ``local-chat-
completions`` runs the shipped generation task; the scores are written out, and every
loglikelihood lm-eval computed equals the model's own, from a full forward pass."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.data.tokenizer import save_tokenizer, train_tokenizer
from cpmjax.model import forward
from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

TASKS = Path(__file__).parent / "fixtures" / "lm_eval"
TEXT = [json.loads(line)["question"] for f in ("tiny_mc.jsonl", "tiny_gen.jsonl")
        for line in (TASKS / f).read_text().splitlines()] * 30


@pytest.fixture(scope="module")
def served(cfg, params, tmp_path_factory):
    tok = train_tokenizer(TEXT + ["fox dog cat chunks rain lakes join sleep"] * 30, 300)
    folder = save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")
    sched = make_scheduler(cfg, params, tok, max_slots=2, max_len=256, chunk=32)
    srv = BackgroundServer(create_app(sched, tok, model_name="tiny"))
    yield srv, folder
    srv.stop()
    sched.stop()


def test_lm_eval_loglikelihood_and_generation(served, cfg, params, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    srv, folder = served
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.chdir(TASKS)  # the task files name their data files relative to here
    tasks = TaskManager(include_path=str(TASKS))
    mc = lm_eval.simple_evaluate(
        model="local-completions", tasks=["cpmjax_tiny_mc"], task_manager=tasks,
        log_samples=True, model_args={
            "base_url": srv.url + "/v1/completions", "model": "tiny", "tokenizer": str(folder),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_retries": 1,
            "max_length": 256})
    gen = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["cpmjax_tiny_gen"], task_manager=tasks,
        apply_chat_template=True, model_args={
            "base_url": srv.url + "/v1/chat/completions", "model": "tiny", "max_retries": 1})
    scores = {"cpmjax_tiny_mc": mc["results"]["cpmjax_tiny_mc"],
              "cpmjax_tiny_gen": gen["results"]["cpmjax_tiny_gen"]}
    out = tmp_path / "scores.json"
    out.write_text(json.dumps(scores, indent=2, default=str))
    assert 0.0 <= scores["cpmjax_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= scores["cpmjax_tiny_gen"]["exact_match,none"] <= 1.0
    assert json.loads(out.read_text())["cpmjax_tiny_mc"]["acc,none"] == scores[
        "cpmjax_tiny_mc"]["acc,none"]

    # lm-eval's loglikelihoods are the model's: recompute one (context, continuation) pair
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    sample = mc["samples"]["cpmjax_tiny_mc"][0]
    context, continuation = sample["arguments"][0][0], sample["arguments"][0][1]
    ctx, whole = hf(context)["input_ids"], hf(context + continuation)["input_ids"]
    logits = forward(params, cfg, jnp.asarray([whole], jnp.int32)).logits[0]
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    want = sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))
    assert sample["resps"][0][0][0] == pytest.approx(want, abs=1e-3)
