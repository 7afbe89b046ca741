"""launch/serve.py with EAGLE-2 tree drafting (``--draft --spec_tree``) as a user runs it: a
subprocess on 127.0.0.1 driven by the official ``openai`` client, its answers checked token for
token against a plain (draft-less) server over the same weights."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest

from cpmjax.config import ModelConfig
from cpmjax.convert import save_hf
from cpmjax.data.tokenizer import load_tokenizer
from cpmjax.model import init_params
from cpmjax.model.mtp import init_mtp_params, save_mtp
from cpmjax.presets import tiny
from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SHAPE = ["--max_slots=4", "--max_len=256", "--chunk=32"]


@pytest.fixture(scope="module")
def models():
    """(cfg, target, draft) where the draft is often right: the target's layers add little to
    the token's embedding (x0.003 on their output projections), so it mostly predicts the next
    token from the current one, and the draft predicts that from the token alone (fc reads the
    embedding half, the draft layer adds nothing). Context still decides some tokens, where the
    draft is rejected (a random draft is never accepted: no multi-token steps to check)."""
    cfg = ModelConfig.from_hf_config({**tiny(), "tie_word_embeddings": False})
    params = jax.tree.map(lambda x: x * 3,
                          init_params(cfg, jax.random.PRNGKey(0), parametrization="standard"))
    layers = params["layers"]
    params["layers"] = {**layers, "wo": layers["wo"] * 0.003,
                        "w_down": layers["w_down"] * 0.003}
    draft = init_mtp_params(cfg, jax.random.key(1))
    d = cfg.hidden_size
    draft["fc"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])
    draft["layer"] = {**draft["layer"], "wo": jnp.zeros_like(draft["layer"]["wo"]),
                      "w_down": jnp.zeros_like(draft["layer"]["w_down"])}
    return cfg, params, draft


@pytest.fixture(scope="module")
def files(models, project_tokenizer, tmp_path_factory):
    """(HF checkpoint folder with the project tokenizer, draft .safetensors) of ``models``."""
    cfg, params, draft = models
    root = tmp_path_factory.mktemp("tree_server")
    save_mtp(cfg, draft, root / "draft.safetensors")
    return (save_hf(cfg, params, root / "tiny", tokenizer=project_tokenizer),
            root / "draft.safetensors")


def launch(args, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "launch/serve.py", *args], cwd=ROOT, env=ENV,
                                stdout=f, stderr=subprocess.STDOUT)


def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """The address uvicorn reports once it listens (``--port=0``: a free port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return m.group(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError("the server did not start: " + log.read_text()[-3000:])


# (kind, request) pairs: greedy and seeded sampled, completions and chat, one streamed
REQUESTS = [
    ("completion", dict(prompt="The list type", max_tokens=12, temperature=0,
                        extra_body={"ignore_eos": True})),
    ("completion", dict(prompt=[1, 40, 41, 42, 43], max_tokens=12, temperature=0,
                        extra_body={"ignore_eos": True})),
    ("chat", dict(messages=[{"role": "user", "content": "hello fox"}], max_tokens=10,
                  temperature=0)),
    ("stream", dict(prompt="Continuous batching", max_tokens=10, temperature=0,
                    extra_body={"ignore_eos": True})),
    ("completion", dict(prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=11,
                        top_p=0.9, extra_body={"ignore_eos": True})),
    ("chat", dict(messages=[{"role": "user", "content": "tell me"}], max_tokens=10,
                  temperature=1.0, seed=3)),
]


def ask(client: openai.OpenAI, kind: str, req: dict) -> tuple[list[int], str]:
    """(token ids, text) of one request."""
    if kind == "chat":
        c = client.chat.completions.create(model="tiny", **req).choices[0]
        return c.model_extra["token_ids"], c.message.content
    if kind == "stream":
        ids, text = [], ""
        for chunk in client.completions.create(model="tiny", stream=True, **req):
            ids += chunk.choices[0].model_extra["token_ids"]
            text += chunk.choices[0].text
        return ids, text
    c = client.completions.create(model="tiny", **req).choices[0]
    return c.model_extra["token_ids"], c.text


def ask_all(url: str, refused: bool = False) -> tuple[list, Exception | None]:
    """Every request of REQUESTS at once (continuous batching), plus, with ``refused``, one the
    speculative engine cannot honour (logprobs); (answers, that request's error)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS) + 1) as ex:
        futs = [ex.submit(ask, client, kind, req) for kind, req in REQUESTS]
        bad = ex.submit(client.completions.create, model="tiny", prompt="The list",
                        max_tokens=4, logprobs=2) if refused else None
        answers = [f.result() for f in futs]
        return answers, None if bad is None else bad.exception()


def test_tree_speculative_server_is_lossless_end_to_end(models, files, project_tokenizer,
                                                        tmp_path):
    """Concurrent greedy and seeded sampled requests to ``--spec_tree=4,2,8`` get exactly the
    plain server's tokens; /metrics reports the acceptance; a logprobs request alone gets 400."""
    cfg, params, _ = models
    checkpoint, draft_file = files
    log = tmp_path / "serve.log"
    proc = launch([f"--checkpoint={checkpoint}", f"--draft={draft_file}", "--spec_tree=4,2,8",
                   "--port=0", "--model_name=tiny", *SHAPE], log)
    try:
        tok = load_tokenizer(str(project_tokenizer))
        sched = make_scheduler(cfg, params, tok, max_slots=4, max_len=256, chunk=32)
        plain_srv = BackgroundServer(create_app(sched, tok, model_name="tiny"))
        try:
            want, _ = ask_all(plain_srv.url)
        finally:
            plain_srv.stop()
            sched.stop()
        url = wait_for_url(proc, log)
        got, err = ask_all(url, refused=True)
        assert isinstance(err, openai.BadRequestError), err
        assert "speculative decoding does not support logprobs" in str(err)
        for (kind, req), g, w in zip(REQUESTS, got, want):
            assert g == w, (kind, req)
        assert len(want[0][0]) == 12 and len(set(want[0][0])) > 2  # not a constant row
        m = httpx.get(url + "/metrics.json").json()
        assert m["engine_error"] is None and m["step_failures"] == 0
        assert m["requests_finished"] == len(REQUESTS)
        # speculative rounds ran (the measured policy probes the tree first) and accepted
        # draft tokens: more than one token per step, at most depth 4 + 1
        assert "tree" in m["compilations"]
        assert m["decode_steps"] > 0 and 1.0 < m["mean_accept_length"] <= 5.0
        prom = httpx.get(url + "/metrics").text
        assert re.search(r"^cpmjax:mean_accept_length [0-9.]+$", prom, re.M), prom[:2000]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_launcher_refuses_a_bad_spec_tree(files):
    """A malformed --spec_tree: a non-zero exit and a usage error naming the flag."""
    checkpoint, draft_file = files
    r = subprocess.run([sys.executable, "launch/serve.py", f"--checkpoint={checkpoint}",
                        f"--draft={draft_file}", "--spec_tree=4,2", "--port=0"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0 and "--spec_tree: tree shape must be three" in r.stderr, \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr
