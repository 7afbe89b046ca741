"""MiniCPM4 chat prompt format (ChatML style).

Source: the ``chat_template`` of MiniCPM4's ``tokenizer_config.json`` (openbmb/MiniCPM4-8B), which
renders every message as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and, for generation, appends
``<|im_start|>assistant\\n``. The thinking switch follows the MiniCPM4.1 / Qwen3 templates: with
``enable_thinking=False`` an empty ``<think>\\n\\n</think>\\n\\n`` block is put after the assistant
prefix so the model answers directly. Uncertain (not checkable offline): whether MiniCPM4 (not 4.1)
templates strip earlier assistant turns' thinking; we keep message content verbatim.
"""

from __future__ import annotations

from typing import Mapping, Sequence

ROLES = ("system", "user", "assistant", "tool")
EMPTY_THINK = "<think>\n\n</think>\n\n"


def apply_chat_template(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                        enable_thinking: bool = True) -> str:
    """The prompt text for ``messages`` (each ``{"role": ..., "content": ...}``)."""
    if not messages:
        raise ValueError("messages must not be empty")
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if not enable_thinking:
            parts.append(EMPTY_THINK)
    return "".join(parts)
