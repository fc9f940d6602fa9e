"""tools/audit.py: a pip-audit report that audited nothing is not reported as clean."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("audit", Path(__file__).parents[1] / "tools" / "audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)

SKIPPED = {
    "name": "fastapi",
    "version": "0.1",
    "skip_reason": "Dependency not found on PyPI and could not be audited",
}


def test_nothing_audited_says_so_and_fails_only_when_strict() -> None:
    report = {"dependencies": [SKIPPED, {**SKIPPED, "name": "celery"}]}
    lines, code = audit.summarize(report, strict=False)
    assert code == 0 and lines == [
        "NOT AUDITED: no vulnerability database answered for any of 2 packages "
        "(pip-audit needs pypi.org or api.osv.dev; this machine reaches neither)"
    ]
    assert audit.summarize(report, strict=True)[1] == 1


def test_a_known_vulnerability_fails_and_names_the_fix() -> None:
    vuln = {"id": "GHSA-xxxx", "fix_versions": ["2.32.0"], "aliases": [], "description": ""}
    report = {
        "dependencies": [
            {"name": "requests", "version": "2.19.0", "vulns": [vuln]},
            {"name": "httpx", "version": "0.28.1", "vulns": []},
            SKIPPED,
        ]
    }
    lines, code = audit.summarize(report, strict=False)
    assert code == 1
    assert lines == [
        "VULNERABLE requests 2.19.0: GHSA-xxxx (fixed in 2.32.0)",
        "audit: 2 packages audited; not audited (1): fastapi",
        "audit: 1 vulnerable of 2 audited",
    ]
    assert audit.summarize({"dependencies": [{"name": "httpx", "version": "1", "vulns": []}]}, False) == (
        ["audit: 0 vulnerable of 1 audited"],
        0,
    )
