"""The documentation site: its examples run, and ``mkdocs build --strict`` builds it offline.

The build test needs the ``docs`` extra (mkdocs, mkdocs-material, mkdocstrings, latex2mathml) and is
skipped without it; the examples need only normkit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NORM_PAGES = {
    "batch-norm": "batch_norm",
    "layer-norm": "layer_norm",
    "instance-norm": "instance_norm",
    "group-norm": "group_norm",
    "rms-norm": "rms_norm",
}
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _examples() -> list[tuple[str, str]]:
    pages = [DOCS / "index.md", *(DOCS / "norms" / f"{page}.md" for page in NORM_PAGES)]
    return [
        (f"{page.relative_to(DOCS)}#{k}", code)
        for page in pages
        for k, code in enumerate(_PYTHON_BLOCK.findall(page.read_text(encoding="utf-8")))
    ]


def test_every_norm_page_has_an_example():
    names = {name.split("#")[0] for name, _ in _examples()}
    assert names >= {f"norms/{page}.md" for page in NORM_PAGES}


@pytest.mark.parametrize("name, code", _examples(), ids=[name for name, _ in _examples()])
def test_page_examples_run(name, code):
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})


def test_the_pictures_are_committed():
    from normkit import explain

    for name in [*explain.NORMS, "overview"]:
        data = (DOCS / "images" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name


_DOCS_DEPS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "latex2mathml")


def _nav_pages() -> list[str]:
    import yaml  # a dependency of mkdocs

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return [p for item in node for p in pages(item)]

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [p for p in pages(config["nav"]) if p.endswith(".md")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [m for m in _DOCS_DEPS if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    missing_pages = [page for page in _nav_pages() if not (DOCS / page).is_file()]
    assert not missing_pages, f"mkdocs.yml's nav lists pages that do not exist: {missing_pages}"
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("page, picture", NORM_PAGES.items())
def test_each_norm_page_shows_its_picture(site, page, picture):
    html = (site / "norms" / page / "index.html").read_text(encoding="utf-8")
    assert f'src="../../images/{picture}.png"' in html
    assert (site / "images" / f"{picture}.png").is_file()
    assert "<math" in html and "arxiv.org/abs/" in html
    assert "\\(" not in html and "\\[" not in html  # every formula became MathML


def test_api_reference_is_generated(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in ("normkit.nn.GroupNorm", "normkit.functional.rms_norm", "normkit.reference.batch_norm",
                   "normkit.backends.use_backend", "normkit.testing.assert_close", "normkit.explain.draw"):
        assert f'id="{anchor}"' in html, anchor
    assert ".. math::" not in html and ":func:`" not in html  # reStructuredText markup was converted


def test_the_site_loads_nothing_from_elsewhere(site):
    for path in site.rglob("*.html"):
        html = path.read_text(encoding="utf-8")
        assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=\"(https?:)?//", html), path
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, path
