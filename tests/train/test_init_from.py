"""Runs that start from trained weights (SFT, QAT): the weights are the given model's, the
schedule warms up again, a resume ignores them, a different model is refused by name; a chat-
format run trains on assistant tokens and a ternary QAT run evaluates the ternary model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import cpmjax
from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model import init_params
from cpmjax.posttrain import sft, tasks
from cpmjax.posttrain.evaluate import assistant_loss
from cpmjax.quant import ternary
from cpmjax.train.checkpoint import load_model, save_model
from cpmjax.train.experiment import experiment_config
from cpmjax.train.loop import train
from tests.conftest import tiny_hf_config

MODEL = tiny_hf_config(vocab_size=4096, hidden_size=64, intermediate_size=64,
                       num_hidden_layers=2, dim_model_base=16, max_position_embeddings=128)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat")
    return (tasks.write_jsonl(root / "train.jsonl", tasks.generate("train", 120)),
            tasks.write_jsonl(root / "held.jsonl", tasks.generate("heldout", 40)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[ModelConfig, dict, Path]:
    cfg = ModelConfig.from_hf_config(MODEL)
    params = init_params(cfg, jax.random.key(7))
    return cfg, params, save_model(cfg, params, tmp_path_factory.mktemp("pre") / "model")


def _config(chat_files, tokenizer, init_from, **train):
    exp = experiment_config(MODEL, "sft_test")
    exp.train.update({**dict(steps=3, warmup_steps=4, seq_len=64, global_batch_size=4,
                             log_every=1, eval_every=3, eval_batches=1, lr=0.0,
                             schedule="constant", init_from=str(init_from)), **train})
    exp.checkpoint.update(dict(every=3, async_save=False))
    exp.data.update(dict(format="chat", train_files=str(chat_files[0]),
                         valid_file=str(chat_files[1]), tokenizer=str(tokenizer)))
    return exp


def _metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_sft_run_starts_from_the_given_weights_and_resumes(chat_files, pretrained,
                                                           project_tokenizer, tmp_path, capsys):
    cfg, params, folder = pretrained
    exp = _config(chat_files, project_tokenizer, folder)  # lr 0: the weights must not move
    final = train(exp, str(tmp_path / "run"))
    assert "weights from" in capsys.readouterr().out
    _, after = load_model(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # eval_loss is the held-out assistant-token loss of those weights
    _, rows, _ = sft.chat_dataset(chat_files[1], str(project_tokenizer), 64)
    batches = exp.train.global_batch_size * exp.train.eval_batches
    sub = sft.ChatRows(rows.tokens[:batches], rows.seg[:batches], rows.flags[:batches])
    assert final["eval_loss"] == pytest.approx(assistant_loss(cfg, params, sub, 4), rel=1e-5)
    assert final["eval_loss"] < final["unigram_loss"] * 3  # a real loss, not padding
    # resuming continues the run; init_from is not read again (the path may be gone)
    exp2 = _config(chat_files, project_tokenizer, tmp_path / "gone", steps=5, lr=1e-3)
    train(exp2, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and "weights from" not in out
    lrs = [m["lr"] for m in _metrics(tmp_path / "run")]
    assert lrs[3] == pytest.approx(1e-3 * 4 / 4) and lrs[0] == 0.0


def test_init_from_hf_folder_warms_up_and_refuses_other_models(chat_files, pretrained,
                                                               project_tokenizer, tmp_path):
    cfg, params, _ = pretrained
    hf = cpmjax.save_hf(cpmjax.Model(cfg, params), tmp_path / "hf")
    exp = _config(chat_files, project_tokenizer, hf, lr=2e-3, steps=2, eval_every=2)
    train(exp, str(tmp_path / "run"))
    lrs = [m["lr"] for m in _metrics(tmp_path / "run")]
    assert lrs == pytest.approx([2e-3 / 4, 2e-3 * 2 / 4])  # warmup from step 0 again
    other = ModelConfig.from_hf_config({**MODEL, "num_hidden_layers": 3})
    odd = save_model(other, init_params(other, jax.random.key(0)), tmp_path / "other")
    with pytest.raises(ConfigError, match="'train.init_from': the model at .* differs from this "
                                          "config's model in num_hidden_layers"):
        train(_config(chat_files, project_tokenizer, odd), str(tmp_path / "run2"))
    with pytest.raises(ConfigError, match="'train.init_from': no checkpoint at"):
        train(_config(chat_files, project_tokenizer, tmp_path / "none"), str(tmp_path / "run3"))
    both = _config(chat_files, project_tokenizer, hf, freeze_target=str(hf), mtp_weight=1.0)
    with pytest.raises(ConfigError, match="'train.init_from' and 'train.freeze_target'"):
        train(both, str(tmp_path / "run4"))


def test_qat_run_trains_and_evaluates_the_ternary_model(chat_files, pretrained,
                                                         project_tokenizer, tmp_path):
    cfg, _, folder = pretrained
    exp = _config(chat_files, project_tokenizer, folder, lr=1e-2, steps=4, eval_every=4)
    exp.qat.update(dict(enabled=True, group_size=16))
    final = train(exp, str(tmp_path / "qat"))
    _, latent = load_model(tmp_path / "qat")
    tc = ternary.ternary_config_of_run(tmp_path / "qat")
    assert tc == ternary.TernaryConfig(group_size=16)
    _, rows, _ = sft.chat_dataset(chat_files[1], str(project_tokenizer), 64)
    sub = sft.ChatRows(rows.tokens[:4], rows.seg[:4], rows.flags[:4])
    packed = ternary.pack_params(latent, tc)
    assert final["eval_loss"] == pytest.approx(assistant_loss(cfg, packed, sub, 4), rel=1e-4)
    assert final["eval_loss"] != pytest.approx(assistant_loss(cfg, latent, sub, 4), rel=1e-3)
    bad = _config(chat_files, project_tokenizer, folder)
    bad.qat.update(dict(enabled=True, group_size=24))
    with pytest.raises(ConfigError, match="'qat.group_size': 24 does not divide"):
        train(bad, str(tmp_path / "bad"))
