"""The verifiable instruction set: determinism, disjoint splits, formats and the judge."""

from __future__ import annotations

import json

import pytest

from cpmjax.data.tokenizer import load_tokenizer
from cpmjax.posttrain import tasks


def _key(ex: dict) -> tuple[str, str]:
    return ex["family"], ex["messages"][0]["content"]


def test_same_arguments_same_examples_and_seeds_differ():
    a = tasks.generate("train", 70, seed=3)
    assert a == tasks.generate("train", 70, seed=3)
    assert a != tasks.generate("train", 70, seed=4)
    assert json.loads(json.dumps(a)) == a  # JSON-able as is


def test_families_take_turns_and_counts():
    ex = tasks.generate("heldout", 23, families=["sort", "copy"])
    assert [e["family"] for e in ex[:4]] == ["sort", "copy", "sort", "copy"]
    assert len(ex) == 23 and sum(e["family"] == "sort" for e in ex) == 12


def test_echo_is_opt_in_and_long_tailed():
    assert "echo" not in {e["family"] for e in tasks.generate("train", 80)}
    echo = tasks.generate("train", 2000, families=["echo"])
    lengths = sorted(len(e["answer"].split()) for e in echo)
    assert lengths[0] >= 2 and lengths[-1] <= 96
    assert lengths[len(lengths) // 2] <= 6  # median: short
    assert lengths[int(0.9 * len(lengths))] >= 20 and lengths[-1] >= 80  # a long tail
    for e in echo[:50]:
        assert e["messages"][0]["content"] == f"Echo: {e['answer']}"
        assert tasks.reward(e, e["answer"] + "<|im_end|>") == 1.0
        assert tasks.reward(e, e["answer"] + " k") == 0.0


def test_splits_never_share_a_problem_and_heldout_has_no_repeats():
    train = {_key(e) for e in tasks.generate("train", 3500, seed=0)}
    for seed in (0, 1):
        held = tasks.generate("heldout", 350, seed=seed)
        keys = [_key(e) for e in held]
        assert len(set(keys)) == len(keys)
        assert not train & set(keys)
        assert all(e["split"] == "heldout" == tasks.problem_split(*_key(e)) for e in held)


def test_every_reference_answer_passes_its_own_check_and_format():
    for ex in tasks.generate("train", 700) + tasks.generate("heldout", 140):
        assert ex["messages"][-1] == {"role": "assistant", "content": ex["answer"]}
        assert tasks.check(ex, ex["answer"]) and tasks.well_formed(ex, ex["answer"])
        assert tasks.reward(ex, ex["answer"]) == 1.0


def test_family_answers_are_right():
    by = {e["family"]: e for e in tasks.generate("train", 7, seed=5)}
    items = by["reverse"]["messages"][0]["content"].split(": ")[1].split()
    assert by["reverse"]["answer"].split() == items[::-1]
    digits = by["sort"]["messages"][0]["content"].split(": ")[1].split()
    assert by["sort"]["answer"].split() == sorted(digits)
    prompt = by["lookup"]["messages"][0]["content"]
    pairs = dict(p.split("=") for p in prompt.split(". ")[0].split())
    assert by["lookup"]["answer"] == pairs[prompt.rsplit(" ", 1)[1].rstrip("?")]
    expr = by["arithmetic"]["messages"][0]["content"][len("What is "):-1]
    a, op, b = expr.split()
    assert int(by["arithmetic"]["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_judge_outputs():
    ex = {"family": "convert", "answer": "0.25", "id": "x"}
    assert tasks.check(ex, " 0.25<|im_end|>\n")
    assert tasks.check(ex, "<think>\n250 / 1000\n</think>\n\n0.250")  # thinking ignored
    assert tasks.check(ex, "0.2500000001")  # within the relative tolerance
    assert not tasks.check(ex, "0.26")
    assert not tasks.check(ex, "The answer is 0.25")  # extra words fail the format check
    assert not tasks.well_formed(ex, "0.25 kg") and tasks.reward(ex, "0.25 kg") == 0.0
    seq = {"family": "copy", "answer": "a b c", "id": "y"}
    assert tasks.check(seq, "a b c</s>junk") and not tasks.check(seq, "a  b c")
    assert not tasks.check(seq, "a b") and not tasks.check(seq, "")
    assert tasks.check({"family": "arithmetic", "answer": "-5"}, "-5")
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        tasks.check({"family": "nope", "answer": "1"}, "1")


def test_accuracy_report():
    ex = tasks.generate("heldout", 4, families=["copy", "count"])
    report = tasks.accuracy(ex, [ex[0]["answer"], "9", "zzz", ex[3]["answer"]])
    assert report["accuracy"] == 0.5 and report["n"] == 4
    assert report["by_family"] == {"copy": 0.5, "count": 0.5}
    assert report["well_formed"] == 0.75  # "zzz" is a well-formed copy answer, just wrong
    with pytest.raises(ValueError, match="2 examples but 1 outputs"):
        tasks.accuracy(ex[:2], ["x"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.generate("test", 3)
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        tasks.generate("train", 3, families=["copy", "poetry"])
    with pytest.raises(ValueError, match="n must be >= 0"):
        tasks.generate("train", -1)


def test_items_are_single_tokens_of_the_project_tokenizer(project_tokenizer):
    tok = load_tokenizer(project_tokenizer)
    for item in list(tasks.LETTERS) + [str(d) for d in range(10)]:
        assert len(tok.encode(" " + item, add_special_tokens=False).ids) == 1, item


def test_build_and_read_back(tmp_path):
    folder = tasks.build_instruct_set(tmp_path, n_train=14, n_heldout=7, seed=2)
    train = tasks.read_jsonl(folder / "train.jsonl")
    assert train == tasks.generate("train", 14, seed=2)
    assert tasks.read_jsonl(folder / "heldout.jsonl") == tasks.generate("heldout", 7, seed=2)
    mtime = (folder / "train.jsonl").stat().st_mtime_ns
    assert tasks.build_instruct_set(tmp_path, 14, 7, 2) == folder  # reused, not rebuilt
    assert (folder / "train.jsonl").stat().st_mtime_ns == mtime
    mixed = tasks.build_instruct_set(tmp_path, 14, 7, 2, families=["copy", "echo"])
    assert mixed != folder  # keyed by the families
    assert tasks.read_jsonl(mixed / "train.jsonl") == tasks.generate("train", 14, 2,
                                                                     ["copy", "echo"])
    (tmp_path / "bad.jsonl").write_text('{"family": "copy"}\n\n{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: not an instruction-set example"):
        tasks.read_jsonl(tmp_path / "bad.jsonl")


def test_prompt_messages_drop_the_answer():
    ex = tasks.generate("train", 1)[0]
    assert tasks.prompt_messages(ex) == ex["messages"][:1]
    assert tasks.format_number(250.0) == "250" and tasks.format_number(0.1) == "0.1"

