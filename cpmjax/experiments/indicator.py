"""ScalingBench-style indicator (MiniCPM4 report, arXiv 2506.07900 §2.3.1): the conditional loss
of a held-out verifiable set's answer tokens (and worked-solution tokens) given the question, for
any checkpoint; and how well it predicts downstream accuracy through a fitted
accuracy = sigmoid(a * indicator + b), compared with plain held-out LM loss.

The verifiable set is the project's instruction set (``cpmjax.posttrain.tasks``: held-out split,
checkable answers). Base models see it as plain text, one problem per document::

    Q: What is 23 + 58?
    S: 23 + 58 = 81      (the worked solution; with ``with_solution``)
    A: 81

``indicator`` = mean NLL per token over the ``S:``/``A:`` lines' tokens after the question (the
report's "loss on reasoning steps plus label given the input"); ``accuracy`` = exact match (the
set's own judge) of the greedy continuation after ``A:`` generated through the serving engine,
up to the end of the line. ``task_corpus`` writes the train split in the same format, so studies
can mix it into pre-training (``configs/ablations/task_mix.py``) and give the fit models that
span accuracy.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpmjax.atomic import atomic_file, write_json, write_text
from cpmjax.plotting import pyplot, save_png
from cpmjax.posttrain import tasks

TASK_CORPUS_VERSION = 1
_ARITH = re.compile(r"What is (-?\d+) ([+-]) (-?\d+)\?")
_CONVERT = re.compile(r"Convert (\S+) (\S+) to (\S+)\.")


def solution_text(example: tasks.Example) -> str:
    """A short worked solution for the example's family (derived from prompt and answer)."""
    prompt, answer, family = example["messages"][0]["content"], str(example["answer"]), \
        example["family"]
    if family == "arithmetic":
        a, op, b = _ARITH.fullmatch(prompt).groups()
        return f"{a} {op} {b} = {answer}"
    if family == "convert":
        x, src, dst = _CONVERT.fullmatch(prompt).groups()
        factor = next(f for big, small, f in tasks.UNITS if {big, small} == {src, dst})
        big = next(big for big, small, _ in tasks.UNITS if {big, small} == {src, dst})
        how = "times" if src == big else "divided by"
        return f"1 {big} is {factor} {dst if src == big else src}, so {x} {how} {factor}"
    if family == "lookup":
        key = prompt.rsplit("What is ", 1)[1].rstrip("?")
        return f"{key}={answer}"
    if family == "count":
        return " ".join(str(i) for i in range(1, int(answer) + 1))
    if family == "sort":
        return f"smallest first: {answer}"
    if family == "reverse":
        return f"last first: {answer}"
    return f"the same items: {answer}"


def question_text(example: tasks.Example) -> str:
    return f"Q: {example['messages'][0]['content']}\n"


def target_text(example: tasks.Example, with_solution: bool) -> str:
    sol = f"S: {solution_text(example)}\n" if with_solution else ""
    return f"{sol}A: {example['answer']}\n"


def task_corpus(cache_dir: str | os.PathLike, n: int = 20_000, seed: int = 0,
                with_solution: bool = True) -> Path:
    """The instruction set's train split as plain-text documents (JSONL), built once."""
    path = Path(cache_dir) / "tasks" / (f"train-v{tasks.VERSION}.{TASK_CORPUS_VERSION}-n{n}-s{seed}"
                                        f"{'-sol' if with_solution else ''}.jsonl")
    if not path.is_file():
        import json

        with atomic_file(path) as f:
            for ex in tasks.generate("train", n, seed):
                f.write(json.dumps({"text": question_text(ex) + target_text(ex, with_solution)})
                        + "\n")
    return path


def heldout(rows: int, seed: int = 0) -> list[tasks.Example]:
    return tasks.generate("heldout", rows, seed)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def indicator_loss(cfg: Any, params: Any, tokenizer: Any, examples: Sequence[tasks.Example],
                   with_solution: bool = True, batch: int = 32) -> float:
    """Mean NLL (nats per token) of the solution and answer tokens given ``<s>`` + question."""
    import jax
    import jax.numpy as jnp

    from cpmjax.data.tokenizer import BOS_ID
    from cpmjax.model import forward

    rows = []
    for ex in examples:
        q = [BOS_ID] + _encode(tokenizer, question_text(ex))
        t = _encode(tokenizer, target_text(ex, with_solution))
        rows.append((q + t, len(q)))
    width = max(len(r) for r, _ in rows)
    if width > cfg.max_position_embeddings:
        raise ValueError(f"an indicator row has {width} tokens, past the model's context "
                         f"{cfg.max_position_embeddings}")
    tok = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for i, (ids, q) in enumerate(rows):
        tok[i, :len(ids)] = ids
        mask[i, q - 1:len(ids) - 1] = 1.0  # predictions of the target tokens

    @jax.jit
    def nll_sums(p: Any, t: jax.Array, m: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(forward(p, cfg, t).logits[:, :-1].astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, t[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * m)

    total = sum(float(nll_sums(params, jnp.asarray(tok[i:i + batch]),
                               jnp.asarray(mask[i:i + batch])))
                for i in range(0, len(rows), batch))
    return total / float(mask.sum())


def task_accuracy(cfg: Any, params: Any, tokenizer: Any, examples: Sequence[tasks.Example],
                  with_solution: bool = True, max_new_tokens: int = 24, max_slots: int = 16
                  ) -> dict[str, Any]:
    """Greedy answers through the serving engine, judged by the instruction set's ``check``.
    The model continues after the question (``S:`` line first when ``with_solution``); its
    answer is what follows ``A:`` on that line."""
    from cpmjax.data.tokenizer import BOS_ID
    from cpmjax.serve.generate import generate

    lead = "" if with_solution else "A:"
    prompts = [[BOS_ID] + _encode(tokenizer, question_text(ex) + lead) for ex in examples]
    outs = generate(cfg, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                    max_slots=max_slots)
    answers = [_answer_line(tokenizer.decode(o), with_solution) for o in outs]
    return tasks.accuracy(list(examples), answers)


def _answer_line(text: str, with_solution: bool) -> str:
    if with_solution:
        m = re.search(r"(?:^|\n)A:([^\n]*)", text)
        return m.group(1) if m else ""
    return text.split("\n", 1)[0]


def evaluate_checkpoint(path: str, rows: int = 64, accuracy: bool = False,
                        cache_dir: str = ".cache/cpmjax", seed: int = 0,
                        with_solution: bool = True) -> dict[str, Any]:
    """``indicator`` (and ``accuracy``, ``accuracy_by_family``) of a checkpoint
    (``cpmjax.load``: run dir, cpmjax checkpoint or HF folder) on ``rows`` held-out problems."""
    import cpmjax

    model = cpmjax.load(path)
    tok = model.tokenizer
    if tok is None:
        from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer

        tok = load_tokenizer(get_or_build_default_tokenizer(cache_dir, model.config.vocab_size))
    examples = heldout(rows, seed)
    out: dict[str, Any] = {"indicator": indicator_loss(model.config, model.params, tok,
                                                       examples, with_solution)}
    if accuracy:
        acc = task_accuracy(model.config, model.params, tok, examples, with_solution)
        out.update(accuracy=acc["accuracy"], accuracy_by_family=acc["by_family"])
    return out


# ---- predicting accuracy ---------------------------------------------------------------------

def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_sigmoid(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = sigmoid(a * x + b) (scipy's curve_fit, started from the
    logistic regression of the clipped targets)."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(x, float), np.asarray(y, float)
    z = np.log(np.clip(y, 0.02, 0.98) / (1 - np.clip(y, 0.02, 0.98)))
    a0, b0 = np.polyfit(x, z, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(z)))
    try:
        (a, b), _ = curve_fit(lambda t, a, b: _sigmoid(a * t + b), x, y, p0=(a0, b0),
                              maxfev=20_000)
    except RuntimeError:  # no convergence: keep the linearised fit
        a, b = a0, b0
    return float(a), float(b)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def predictor_quality(x: Sequence[float], acc: Sequence[float]) -> dict[str, Any]:
    """Rank correlation with accuracy, the fit's RMSE, and its leave-one-out RMSE (each model
    predicted by a fit on the others: the honest figure for so few models)."""
    x, acc = np.asarray(x, float), np.asarray(acc, float)
    a, b = fit_sigmoid(x, acc)
    rmse = float(np.sqrt(np.mean((_sigmoid(a * x + b) - acc) ** 2)))
    loo = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        ai, bi = fit_sigmoid(x[keep], acc[keep])
        loo.append(float(_sigmoid(ai * x[i] + bi)) - acc[i])
    return {"a": a, "b": b, "spearman": spearman(x, acc), "rmse": rmse,
            "loo_rmse": float(np.sqrt(np.mean(np.square(loo))))}


def compare_predictors(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Indicator vs held-out LM loss as predictors of accuracy over ``points`` (dicts with
    ``indicator``, ``final_eval_loss``, ``accuracy``)."""
    pts = [p for p in points if all(isinstance(p.get(k), (int, float)) and math.isfinite(p[k])
                                    for k in ("indicator", "final_eval_loss", "accuracy"))]
    if len(pts) < 4:
        raise ValueError(f"{len(pts)} models with indicator, held-out loss and accuracy; the fit "
                         "needs at least 4")
    acc = [p["accuracy"] for p in pts]
    return {"models": len(pts), "points": pts,
            "indicator": predictor_quality([p["indicator"] for p in pts], acc),
            "heldout_lm_loss": predictor_quality([p["final_eval_loss"] for p in pts], acc)}


def plot_predictors(result: dict[str, Any], path: Path, title: str = "") -> Path:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    acc = np.asarray([p["accuracy"] for p in result["points"]])
    for ax, key, field, label in zip(axes, ("indicator", "heldout_lm_loss"),
                                     ("indicator", "final_eval_loss"),
                                     ("indicator: answer+solution NLL given the question",
                                      "held-out LM loss (corpus)")):
        x = np.asarray([p[field] for p in result["points"]])
        q = result[key]
        ax.scatter(x, acc, color="C0", zorder=3)
        grid = np.linspace(x.min() - 0.05 * np.ptp(x), x.max() + 0.05 * np.ptp(x), 200)
        ax.plot(grid, _sigmoid(q["a"] * grid + q["b"]), color="C3")
        ax.set(xlabel=label, title=f"Spearman {q['spearman']:+.2f}, RMSE {q['rmse']:.3f}, "
               f"leave-one-out {q['loo_rmse']:.3f}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (held-out tasks)")
    fig.suptitle(title or f"accuracy = sigmoid(a x + b) over {result['models']} models",
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_predictor_report(points: Sequence[dict[str, Any]], out: str | os.PathLike,
                           command: str = "") -> dict[str, Any]:
    """``<out>.json``, ``<out>.md`` and ``<out>.png``."""
    result = compare_predictors(points)
    result["command"] = command
    base = Path(out)
    write_json(base.with_suffix(".json"), result, indent=1)
    rows = [f"| {name} | {q['spearman']:+.3f} | {q['rmse']:.4f} | {q['loo_rmse']:.4f} | "
            f"{q['a']:.3f} | {q['b']:.3f} |" for name, q in
            (("indicator", result["indicator"]), ("held-out LM loss", result["heldout_lm_loss"]))]
    write_text(base.with_suffix(".md"), "\n".join([
        f"# Predicting task accuracy ({result['models']} models)", "", f"Command: `{command}`",
        "", "| predictor | Spearman vs accuracy | fit RMSE | leave-one-out RMSE | a | b |",
        "|---|---|---|---|---|---|", *rows, ""]))
    plot_predictors(result, base.with_suffix(".png"))
    return result


def study_points(study_dirs: Sequence[str | os.PathLike], rows: int = 64,
                 evaluate_missing: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """(run, indicator, final_eval_loss, accuracy) of every finished run of the given study
    folders; runs evaluated without indicator or accuracy are evaluated here when
    ``evaluate_missing`` (cached in the run folder as ``indicator_eval.json``)."""
    import json

    from cpmjax.experiments import rundir

    points = []
    for study in study_dirs:
        for run in sorted((Path(study) / "runs").iterdir()):
            result = rundir.read_result(run)
            if result is None:
                continue
            point = {"study": Path(study).name, "run": result["name"],
                     "final_eval_loss": result.get("final_eval_loss"),
                     "indicator": result.get("indicator"), "accuracy": result.get("accuracy")}
            if (point["indicator"] is None or point["accuracy"] is None) and evaluate_missing:
                cache = run / "indicator_eval.json"
                key = {"rows": rows, "seed": seed}
                cached = json.loads(cache.read_text()) if cache.is_file() else {}
                if cached.get("key") != key:
                    cfg = rundir.read_spec(run)["config"]
                    cached = {"key": key, **evaluate_checkpoint(
                        str(run), rows, True, cfg["data"]["cache_dir"], seed)}
                    write_json(cache, cached)
                point.update(indicator=cached["indicator"], accuracy=cached["accuracy"])
            points.append(point)
    return points
