"""MiniCPM4 chat template text."""

import pytest

from cpmjax.serve.chat import apply_chat_template


def test_chatml_layout_with_generation_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert apply_chat_template(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_thinking_off_inserts_empty_think_block():
    out = apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=False).endswith("assistant\n")


@pytest.mark.parametrize("msgs, match", [([], "empty"), ([{"role": "bot", "content": "x"}], "role"),
                                         ([{"role": "user", "content": 3}], "content")])
def test_bad_messages(msgs, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(msgs)
