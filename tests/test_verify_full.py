"""The exhaustive conformance sweep (``normkit verify --full``): minutes, so marked slow.

Runs with ``pytest -m slow``; the default test run and CI run the default matrix instead (in
``normkit verify`` and tests/test_cli.py).
"""

from __future__ import annotations

import pytest

from normkit import verify


@pytest.mark.slow
def test_full_conformance_matrix_passes():
    results = verify.run(verify.build_matrix(full=True))
    failures = [str(r.case) for r in results if not r.ok]
    assert not failures, f"{len(failures)} failing cases, first: {failures[:5]}"
