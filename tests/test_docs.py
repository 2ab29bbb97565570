"""The repository stands alone: the wire contract is docs/protocol.md, no
tracked file points outside the repository for it, and every relative link
in the README and docs/ resolves to a file inside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("../" + "shared", "shared/" + "spec")  # split so this file does not match itself


def tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository_for_the_contract() -> None:
    offenders = []
    for path in tracked():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_and_docs_link_only_inside_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
                continue
            file = (page.parent / target.split("#")[0]).resolve()
            if not file.is_relative_to(ROOT) or not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_contract_is_in_the_repository_with_a_change_log() -> None:
    text = (ROOT / "docs/protocol.md").read_text(encoding="utf-8")
    assert text.startswith("# OMS wire contract, version 1.")
    assert "## Change log" in text
    for name in ("submit_order", "get_order", "cancel_order", "list_orders", "retry_step",
                 "skip_step", "abort_order", "order_counts", "fallout", "internal_error",
                 "order_jeopardy", "command_id"):
        assert f"`{name}`" in text, name
    assert "protocol.md" in (ROOT / "docs/contract.md").read_text(encoding="utf-8")
    assert "docs/protocol.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_request_type_the_intake_serves_is_in_the_contract() -> None:
    source = (ROOT / "actors/intake.py").read_text(encoding="utf-8")
    served = set(re.findall(r'^\s+"([a-z_]+)": ', source, flags=re.M))
    assert {"submit_order", "cancel_order", "retry_step"} <= served
    text = (ROOT / "docs/protocol.md").read_text(encoding="utf-8")
    assert all(f"`{t}`" in text for t in served), served
