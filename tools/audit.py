"""Audit the installed dependencies for known vulnerabilities with pip-audit, and say plainly what was not
audited.

    python tools/audit.py [--strict]

pip-audit asks PyPI's JSON API (or OSV) about every installed distribution. Where neither is reachable
(an offline mirror, CI without internet) it skips each one as "not found", and its exit status alone
would read as a clean audit; this script counts the skips and prints ``NOT AUDITED`` instead. Packages
that are not on PyPI by design (this project itself, torch / torchvision from local wheels) are skipped
and named. Exit status: 1 when a known vulnerability is found (always), 1 with ``--strict`` when nothing
could be audited, else 0. ``make test`` runs it without ``--strict``; ``make audit`` with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

NOT_ON_PYPI = {"distill"}  # this project, installed editable


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strict", action="store_true", help="fail when nothing could be audited")
    parser.add_argument("--timeout", type=int, default=15, help="seconds per vulnerability-service request")
    parser.add_argument("--total-timeout", type=int, default=180, help="seconds for the whole audit")
    return parser


def _requirements() -> list[str]:
    """The installed distributions as ``name==version`` lines (local builds like ``torch==X+cpu`` kept)."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format", "json", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [f"{d['name']}=={d['version']}" for d in json.loads(frozen) if d["name"] not in NOT_ON_PYPI]


def audit(strict: bool, timeout: int, total: int) -> int:
    requirements = _requirements()
    with tempfile.TemporaryDirectory() as folder:
        listing = Path(folder) / "requirements.txt"
        listing.write_text("\n".join(requirements) + "\n")
        try:
            answer = subprocess.run(
                [sys.executable, "-m", "pip_audit", "--requirement", str(listing), "--no-deps",
                 "--disable-pip", "--format", "json", "--progress-spinner", "off", "--timeout", str(timeout)],
                capture_output=True, text=True, timeout=total,
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # a network that drops packets instead of refusing: not a hang
            print(f"NOT AUDITED: pip-audit did not finish within {total} s")
            return 1 if strict else 0
    try:
        report = json.loads(answer.stdout)
    except json.JSONDecodeError:
        print(f"audit: pip-audit did not report (exit {answer.returncode}):\n{answer.stderr.strip()[-2000:]}")
        return 1 if strict else 0
    lines, code = summarize(report, strict)
    print("\n".join(lines))
    return code


def summarize(report: dict, strict: bool) -> tuple[list[str], int]:
    """The lines to print for pip-audit's JSON ``report`` and the exit status (see the module docstring)."""
    dependencies = report.get("dependencies", [])
    found = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if d.get("skip_reason")]
    audited = len(dependencies) - len(skipped)
    lines = []
    for dep in found:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            lines.append(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})")
    if audited == 0:
        lines.append(
            f"NOT AUDITED: no vulnerability database answered for any of {len(skipped)} packages "
            "(pip-audit needs pypi.org or api.osv.dev; this machine reaches neither)"
        )
        return lines, 1 if strict or found else 0
    if skipped:
        names = ", ".join(sorted(d["name"] for d in skipped))
        lines.append(f"audit: {audited} packages audited; not audited ({len(skipped)}): {names}")
    lines.append(f"audit: {len(found)} vulnerable of {audited} audited")
    return lines, 1 if found else 0


def main() -> None:
    args = get_args_parser().parse_args()
    sys.exit(audit(args.strict, args.timeout, args.total_timeout))


if __name__ == "__main__":
    main()
