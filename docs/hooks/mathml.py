"""MkDocs hook: the pages' LaTeX math rendered to MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps ``$...$`` and ``$$...$$`` in ``<span class="arithmatex">``
and ``<div class="arithmatex">``; this hook replaces the LaTeX inside with MathML from ``latex2mathml``
(a pure-Python package, the ``docs`` extra), which browsers render natively. The site therefore
loads no math script or font from anywhere, and the build itself fetches nothing. The LaTeX source
is kept in each formula's ``<annotation encoding="application/x-tex">`` (copying a formula copies it).

MathML Core, what Chromium renders, ignores ``mathvariant`` except on single-letter identifiers, so
double-struck, script and bold letters are written as their Unicode mathematical alphanumeric
characters instead (``\\mathbb 1`` as U+1D7D9, ``\\mathcal N`` as U+1D4A9), as MathML Core advises.

Spacing follows TeX where MathML's defaults differ: ``\\mathrm{rstd}`` is one upright identifier,
not four letters; ``/`` is an ordinary symbol, without space around it (``\\partial L/\\partial x``);
``*`` stands for "any number of dimensions" in shapes such as ``(N, C, *)``, an ordinary symbol
rather than a binary operator; and a plain ``|`` is an absolute-value or set-size bar, so the bars of
a formula are marked as opening and closing fences in turn (``m = |S|`` would otherwise space them
like relations).

A formula that cannot be converted stays as LaTeX text and is reported as a warning, which fails a
``mkdocs build --strict``.
"""

from __future__ import annotations

import html
import logging
import re

log = logging.getLogger("mkdocs.hooks.mathml")

_BLOCK = re.compile(r'<div class="arithmatex">\\\[(?P<tex>.*?)\\\]</div>', re.S)
_INLINE = re.compile(r'<span class="arithmatex">\\\((?P<tex>.*?)\\\)</span>', re.S)
_VARIANT = re.compile(r'<(?P<tag>mi|mn) mathvariant="(?P<variant>[a-z-]+)">(?P<text>[^<]*)</(?P=tag)>')

# Unicode's mathematical alphanumeric symbols: the start of each alphabet, and the letters that live
# in the Letterlike Symbols block instead (the holes in the alphabets)
_ALPHABETS = {
    "bold": (0x1D400, 0x1D41A, 0x1D7CE),
    "double-struck": (0x1D538, 0x1D552, 0x1D7D8),
    "script": (0x1D49C, 0x1D4B6, None),
    "fraktur": (0x1D504, 0x1D51E, None),
}
_HOLES = {
    "double-struck": dict(zip("CHNPQRZ", "\u2102\u210d\u2115\u2119\u211a\u211d\u2124", strict=True)),
    "script": dict(
        zip("BEFHILMRego", "\u212c\u2130\u2131\u210b\u2110\u2112\u2133\u211b\u212f\u210a\u2134", strict=True)
    ),
    "fraktur": dict(zip("CHIRZ", "\u212d\u210c\u2111\u211c\u2128", strict=True)),
}


def _styled(variant: str, text: str) -> str | None:
    if variant not in _ALPHABETS:
        return None
    upper, lower, digits = _ALPHABETS[variant]
    out = []
    for ch in html.unescape(text):
        if ch in _HOLES.get(variant, {}):
            out.append(_HOLES[variant][ch])
        elif "A" <= ch <= "Z":
            out.append(chr(upper + ord(ch) - ord("A")))
        elif "a" <= ch <= "z":
            out.append(chr(lower + ord(ch) - ord("a")))
        elif "0" <= ch <= "9" and digits is not None:
            out.append(chr(digits + ord(ch) - ord("0")))
        else:
            return None
    return "".join(out)


def _variants(mathml: str) -> str:
    def swap(m: re.Match[str]) -> str:
        text = _styled(m["variant"], m["text"])
        return m[0] if text is None else f"<mi>{text}</mi>"

    return _VARIANT.sub(swap, mathml)


_STAR = "<mo>&#x0002A;</mo>"
_SLASH = "<mo>&#x0002F;</mo>"
_BAR = '<mo stretchy="false">&#x0007C;</mo>'


_UPRIGHT_RUN = re.compile(r'(?:<mi mathvariant="normal">[A-Za-z]</mi>){2,}')


def _spacing(mathml: str) -> str:
    # \mathrm{rstd} arrives letter by letter: one multi-letter <mi> is upright and kerned as a word
    mathml = _UPRIGHT_RUN.sub(lambda m: "<mi>" + re.sub(r"<[^>]+>", "", m[0]) + "</mi>", mathml)
    mathml = mathml.replace(_STAR, "<mi>&#x0002A;</mi>")
    mathml = mathml.replace(_SLASH, '<mo lspace="0em" rspace="0em">&#x0002F;</mo>')
    parts = mathml.split(_BAR)
    if len(parts) % 2 == 0:  # an odd number of bars: leave them alone
        return mathml
    out = [parts[0]]
    for k, part in enumerate(parts[1:]):
        form = "prefix" if k % 2 == 0 else "postfix"
        out.append(f'<mo stretchy="false" fence="true" form="{form}">&#x0007C;</mo>{part}')
    return "".join(out)


_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def _to_mathml(tex: str, display: str, page: str) -> str | None:
    from latex2mathml.converter import convert

    # \text{normalized\_shape}: latex2mathml keeps the backslash of an escaped underscore in text
    fixed = _TEXT.sub(lambda m: "\\text{" + m[1].replace("\\_", "_") + "}", tex)
    try:
        mathml = convert(fixed, display=display)
    except Exception as e:  # latex2mathml raises assorted exceptions on bad input
        log.warning("%s: cannot render math %r: %s", page, tex, e)
        return None
    body = mathml[mathml.index(">") + 1 : mathml.rindex("</math>")]
    source = html.escape(tex.strip(), quote=False)
    return (
        f'<math xmlns="http://www.w3.org/1998/Math/MathML" display="{display}"><semantics>'
        f"<mrow>{_spacing(_variants(body))}</mrow>"
        f'<annotation encoding="application/x-tex">{source}</annotation></semantics></math>'
    )


def on_page_content(html_text: str, page, **kwargs) -> str:
    name = page.file.src_uri

    def block(m: re.Match[str]) -> str:
        mathml = _to_mathml(html.unescape(m["tex"]), "block", name)
        return m[0] if mathml is None else f'<div class="arithmatex">{mathml}</div>'

    def inline(m: re.Match[str]) -> str:
        mathml = _to_mathml(html.unescape(m["tex"]), "inline", name)
        return m[0] if mathml is None else f'<span class="arithmatex">{mathml}</span>'

    return _INLINE.sub(inline, _BLOCK.sub(block, html_text))
