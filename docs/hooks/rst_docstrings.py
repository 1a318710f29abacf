"""Griffe extension: normkit's reStructuredText docstring markup, rendered as Markdown.

normkit's docstrings follow PyTorch's: Google-style sections (``Args:``, ``Returns:``, ``Raises:``)
around reStructuredText markup (``.. math::`` blocks, ``:math:`` and ``:func:`` roles, ``Example::``
literal blocks), which Sphinx renders and mkdocstrings, a Markdown renderer, would show verbatim. This
extension rewrites that markup, once the package is loaded and before any docstring is parsed:

* ``.. math:: <latex>`` (on its line, continued by the indented lines below) becomes a ``$$`` block and
  ``:math:`<latex>``` becomes ``$<latex>$``: ``pymdownx.arithmatex`` takes both, and the ``mathml``
  hook renders them at build time;
* ``:func:``, ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:`` and ``:exc:`` roles become
  code, linked to the object's entry in the API reference when it names a public normkit object
  (relative names are looked up from the documented object's module and class, as Sphinx does);
* a paragraph that ends in ``::`` (a literal block follows) ends in ``:`` instead;
* a simple table (columns framed by ``=====  =====`` rules) becomes a Markdown table;
* a bullet item's continuation lines, indented by two spaces as reStructuredText has them, are
  indented by four, as Python-Markdown needs them to stay in the item;
* an ``Args:`` entry for several parameters at once (``running_mean, running_var: ...``, as PyTorch
  writes them) becomes one entry per parameter, which is what the Google-style parser understands.

mkdocs.yml loads it with ``extensions: [docs/hooks/rst_docstrings.py]`` in mkdocstrings' options.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>func|class|meth|mod|data|attr|exc|obj|py:\w+):`(?P<target>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<rest>.*)$")
_LITERAL = re.compile(r"(?<=\S)::$")


_ARGS = re.compile(r"^(?P<indent>\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\s*$")
_GROUPED = re.compile(r"^(?P<names>[\w*]+(?:\s*,\s*[\w*]+)+)(?P<rest>\s*(\([^)]*\))?:.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(text: str) -> str:
    """``.. math::`` directives to ``$$`` blocks, at the directive's indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        base = len(m["indent"])
        body = [m["rest"].strip()] if m["rest"].strip() else []
        j = i + 1
        while j < len(lines):
            line = lines[j]
            if line.strip():
                if _indent(line) <= base:
                    break
                body.append(line.strip())
                j += 1
                continue
            # a blank line: the block goes on if the next text is indented under the directive
            k = j
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k < len(lines) and _indent(lines[k]) > base:
                j = k
                continue
            break
        pad = " " * base
        if out and out[-1].strip():
            out.append("")
        out += [f"{pad}$$", *(f"{pad}{b}" for b in body), f"{pad}$$"]
        if j < len(lines) and lines[j].strip():
            out.append("")
        i = j
    return "\n".join(out)


_RULE = re.compile(r"^(?P<indent> *)=+(?: +=+)+ *$")
_BULLET = re.compile(r"^(?P<indent> *)[*+-] \S")


def _cells(line: str, starts: list[int]) -> list[str]:
    """A simple table's row, cut at the columns' start positions."""
    bounds = [*starts[1:], None]
    return [line[a:b].strip().replace("|", "\\|") for a, b in zip(starts, bounds, strict=True)]


def _simple_tables(text: str) -> str:
    """reStructuredText simple tables (rule, header, rule, rows, rule) to Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _RULE.match(lines[i])
        rules = [j for j in range(i, len(lines)) if _RULE.match(lines[j])][:3] if m else []
        if len(rules) < 3 or rules[1] - rules[0] != 2 or any(not lines[j].strip() for j in range(i, rules[2])):
            out.append(lines[i])
            i += 1
            continue
        starts = [r.start() for r in re.finditer(r"=+", lines[i])]
        pad = m["indent"]
        if out and out[-1].strip():
            out.append("")
        out.append(pad + "| " + " | ".join(_cells(lines[i + 1], starts)) + " |")
        out.append(pad + "|" + "---|" * len(starts))
        out += [pad + "| " + " | ".join(_cells(line, starts)) + " |" for line in lines[rules[1] + 1 : rules[2]]]
        i = rules[2] + 1
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def _list_items(text: str) -> str:
    """Bullet items continued two spaces in (reStructuredText) continued four spaces in (Markdown)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _BULLET.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        base = len(m["indent"])
        loose = False  # an item of several paragraphs: Markdown needs a blank line before the next
        while i < len(lines):
            if not lines[i].strip():
                k = i
                while k < len(lines) and not lines[k].strip():
                    k += 1
                if k < len(lines) and _indent(lines[k]) >= base + 2:
                    out += lines[i:k]
                    i = k
                    loose = True
                    continue
                break
            if _indent(lines[i]) < base + 2:
                if loose and _BULLET.match(lines[i]):
                    out.append("")
                break
            out.append("  " + lines[i])
            i += 1
    return "\n".join(out)


def _split_grouped_args(text: str) -> str:
    """``a, b: description`` entries of an ``Args:`` section to one entry per name."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _ARGS.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        base = len(m["indent"])
        item = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            line = lines[i]
            if item is None and line.strip():
                item = _indent(line)
            g = _GROUPED.match(line.strip()) if line.strip() and _indent(line) == item else None
            if not g:
                out.append(line)
                i += 1
                continue
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > item:
                j += 1
            for name in re.split(r"\s*,\s*", g["names"]):
                out.append(" " * item + name + g["rest"])
                out += lines[i + 1 : j]
            i = j
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module's docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._root = pkg
        self._visit(pkg, set())

    def _visit(self, obj: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if member.is_alias:
                continue
            self._visit(member, seen)

    def _resolve(self, target: str, obj: Any) -> str | None:
        """The path of the normkit object ``target`` names, seen from ``obj``, if it is public."""
        root = self._root.path
        candidates = []
        if target.startswith(root + "."):
            candidates.append(target)
        else:
            scope = obj if obj.is_module or obj.is_class else obj.parent
            while scope is not None:
                candidates.append(f"{scope.path}.{target}")
                scope = scope.parent
        for path in candidates:
            try:
                found = self._root[path[len(root) + 1:]] if path != root else self._root
            except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            if any(part.startswith("_") for part in path.split(".")):
                return None
            return path if found is not None else None
        return None

    def _role(self, m: re.Match[str], obj: Any) -> str:
        target = m["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        shown = target.rsplit(".", 1)[-1] if short else target
        if m["role"] in ("func", "meth"):
            shown += "()"
        path = self._resolve(target, obj)
        if path is None:
            return f"`{shown}`"
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    def _convert(self, text: str, obj: Any) -> str:
        text = _split_grouped_args(_list_items(_simple_tables(_math_blocks(text))))
        text = _MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
        text = _ROLE.sub(lambda m: self._role(m, obj), text)
        return "\n".join(_LITERAL.sub(":", line) for line in text.split("\n"))
