"""A checkpoint's chat template rendered as transformers renders it (``render_chat``): used by
``sleep-jax generate|score --chat`` and by a chat model's sleep (``sleep_rows.chat_parts``)."""

from __future__ import annotations


def render_chat(template: str, prompt: str, tokens: dict, tokenizer) -> str:
    """The chat template applied to one user turn, ending with the assistant's header.

    Follows transformers' ``apply_chat_template(add_generation_prompt=True)``: a sandboxed
    jinja2 environment with ``messages``, ``bos_token``, ``eos_token`` and ``raise_exception``.
    """
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    def spell(key):
        i = tokens.get(key)
        return "" if i is None or tokenizer is None else tokenizer.id_to_token(i)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=StrictUndefined)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
        bos_token=spell("bos_id"), eos_token=spell("eos_id"))
