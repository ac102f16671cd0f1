"""Rendering a Hugging Face chat template (Jinja) the way `transformers`' `apply_chat_template` does.

The same environment settings (trim_blocks, lstrip_blocks, a sandbox), the same globals (`raise_exception`,
`strftime_now`) and the `tojson` filter that keeps non-ASCII text, so a template written for transformers
renders byte for byte the same string here. The sandbox matters: a template comes with a downloaded model
and is code; it must not reach Python objects' internals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any


class TemplateError(ValueError):
    """The chat template raised (an unknown role, a bad turn order) or is not valid Jinja."""


def render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
           **context: Any) -> str:
    import jinja2
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **context)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template: {e}") from e


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
