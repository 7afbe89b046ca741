"""Train the speculative draft (the one-layer MTP/EAGLE head; CPM.cu speculative/eagle.py) of the tiny model with
the target frozen, after the main job (``configs/tiny.py``, which writes ``runs/tiny``)::

    python launch/self_distill_data.py --checkpoint=runs/tiny --out=runs/tiny/selfgen.jsonl
    python launch/train.py --config=configs/tiny_draft.py

The data mixes the corpus with the target's own continuations (``selfgen.jsonl``; without it,
``--config.data.train_files=`` trains on the corpus alone).

Only the draft head learns (the objective's MTP term: from h_t and x_{t+1}, predict the target's own
distribution of x_{t+2}, self-distillation, since acceptance is judged against the target); the
run keeps orbax checkpoints like any other and writes ``runs/tiny_draft/draft.safetensors`` in
CPM.cu's EAGLE tensor layout (in the ``mtp`` form, which the file records;
``--config.train.draft_form=cpmcu`` trains CPM.cu's form, the one its released heads use), which
``launch/serve.py --draft=...`` and ``launch/generate.py --draft=...`` load.
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    cfg = experiment_config(presets.tiny(), name="tiny_draft")
    t = cfg.train
    t.freeze_target = "runs/tiny"
    t.mtp_weight = 1.0
    t.mtp_distill = True  # learn what the target predicts, which is what verification accepts
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 600, 30, 256, 16
    t.lr = 3e-3
    t.log_every, t.eval_every = 50, 600
    cfg.checkpoint.every = 200
    d = cfg.data
    d.train_files = f"{d.cache_dir}/corpus/train.jsonl,runs/tiny/selfgen.jsonl"
    d.weights = "1,3"
    d.valid_file = f"{d.cache_dir}/corpus/valid.jsonl"
    return cfg
