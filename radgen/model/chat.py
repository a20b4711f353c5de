"""The generation prompt: one user turn rendered with the tokenizer's chat template, deterministically.

:func:`chat_prompt` renders the text that precedes the model's answer. SmolLM2's template inserts
its own default system turn ("You are a helpful AI assistant named SmolLM, trained by Hugging
Face") when the messages hold none; that text is fixed, so prompts stay deterministic, and
``system=`` replaces it (``None`` removes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PLAIN_PROMPT", "SYSTEM_DEFAULT", "chat_prompt"]

# The fallback prompt when a tokenizer has no chat template (LLaVA-v1 style).
PLAIN_PROMPT = "USER: {text}\nASSISTANT:"
# Templates that print a date (Llama 3.x) read `date_string` and otherwise call strftime_now():
# pin it so a prompt never depends on the day it was rendered. Llama 3.1's own default.
_TEMPLATE_VARS = {"date_string": "26 Jul 2024"}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **_TEMPLATE_VARS)


_SYS, _USR = "\ue000", "\ue001"  # private-use sentinels, never in a real prompt


def _without_system_turn(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The generation prompt of one user turn with no system turn, even for templates that insert
    a default one when none is given.

    Pure string work on three renderings: with a sentinel system text ``S`` and user text ``U``
    the template writes ``P S M U Q`` where ``P`` ends with the system header and ``M`` is the
    system turn's end followed by the user header. A split ``M = end + header`` whose header, with
    its role name read as "system", is the end of ``P`` locates the system turn, which is then cut
    out. A template that adds nothing by default is rendered as is; one whose turns do not have
    this shape (a system header that differs from the user one by more than the role name, or a
    date written into the system turn) keeps its own rendering of the lone user turn."""
    alone = _render(tokenizer, [{"role": "user", "content": user_text}])
    try:
        both = _render(tokenizer, [{"role": "system", "content": _SYS}, {"role": "user", "content": _USR}])
    except Exception:  # a template that refuses system turns never adds one
        return alone
    i, j = both.find(_SYS), both.find(_USR)
    if i < 0 or j < i:
        return alone
    P, M, Q = both[:i], both[i + 1:j], both[j + 1:]
    for k in range(len(M) + 1):
        header = M[k:]
        sys_header = header.replace("user", "system")
        if header and "user" in header and P.endswith(sys_header):
            prompt = P[: len(P) - len(sys_header)] + header + user_text + Q
            return prompt if len(prompt) <= len(alone) else alone
    return alone


SYSTEM_DEFAULT = "default"  # ``system`` value: keep the chat template's own default system turn


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system: str | None = SYSTEM_DEFAULT) -> str:
    """The text that precedes the model's answer to ``user_text``.

    ``system``: ``"default"`` keeps what the chat template does with a lone user turn (SmolLM2 and
    Qwen2.5 add a default system turn of ~20 tokens); ``None`` renders no system turn at all
    (:func:`_without_system_turn`); any other text becomes the system turn. Without a chat
    template: ``"USER: {user_text}\nASSISTANT:"`` (a given ``system`` text goes first, on its
    own line). Deterministic: no date or random content. Tokenise the result with
    ``add_special_tokens=False`` (templates write their own BOS)."""
    if getattr(tokenizer, "chat_template", None):
        if system is None:
            return _without_system_turn(tokenizer, user_text)
        messages = [] if system == SYSTEM_DEFAULT else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": user_text})
        return _render(tokenizer, messages)
    if system == SYSTEM_DEFAULT:
        system = None
    prompt = PLAIN_PROMPT.format(text=user_text)
    return f"{system}\n{prompt}" if system else prompt
