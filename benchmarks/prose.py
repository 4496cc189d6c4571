"""The benchmarks' prose: Jinja templates in ``benchmarks/templates/``, one per benchmark.

A benchmark module measures and returns numbers (:class:`~fedsilo.benchmarks.common.BenchResult`
with ``raw`` data, tables of formatted cells and targets); what a reader is told about
those numbers — how they were measured, what limits them, what a missed target would
need — lives in ``templates/NAME.md.j2`` and is filled in from the numbers here, so a
change of wording never touches measuring code and a change of measurement shows up as
a changed variable.  Undefined variables are errors: a template cannot silently print
nothing where a number was meant.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).with_name("templates")


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        autoescape=False,  # Markdown, not HTML
    )


def prose(template: str, block: str | None = None, **values: Any) -> str:
    """Render ``templates/TEMPLATE`` (or one ``{% block %}`` of it) with ``values``; whitespace-normalised.

    Paragraph text comes back as one line (newlines inside a paragraph become spaces), so a
    template can wrap its sentences freely and the result still fits a Markdown table cell.
    """
    env = _environment()
    tpl = env.get_template(template)
    if block is None:
        text = tpl.render(**values)
    else:
        ctx = tpl.new_context(values)
        text = "".join(tpl.blocks[block](ctx))
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def document(template: str, **values: Any) -> str:
    """Render the whole of ``templates/TEMPLATE`` with ``values``, verbatim: for line-based Markdown (tables, headings).

    Unlike :func:`prose`, whitespace is kept as the template lays it out.
    """
    return _environment().get_template(template).render(**values)
