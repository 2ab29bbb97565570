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


def test_every_error_code_the_service_sends_is_in_the_contract() -> None:
    """Each code of ``oms/errors.py`` that the intake, the domain-events
    endpoint (and the intake's lookup and lister), the router (and its revival
    part), the gateways or the engine use (``errors.X``, or
    ``X`` imported from ``oms.errors``) is a code on the wire: protocol.md
    names it."""
    source = (ROOT / "oms/errors.py").read_text(encoding="utf-8")
    codes = dict(re.findall(r'^([A-Z_]+) = "([a-z_]+)"', source, flags=re.M))
    used = set()
    for name in ("actors/intake.py", "actors/lookup.py", "actors/lister.py",
                 "actors/domain_events.py", "actors/router.py", "actors/revival.py",
                 "gateways/gateway.py", "oms/edge.py", "oms/engine.py", "oms/engine_base.py",
                 "oms/engine_run.py"):
        text = (ROOT / name).read_text(encoding="utf-8")
        used |= set(re.findall(r"\berrors\.([A-Z_]+)\b", text))
        for imported in re.findall(r"^from oms\.errors import (.+)$", text, flags=re.M):
            used |= {n.strip() for n in imported.split(",")}
    assert {"MALFORMED", "BUSY", "UNAVAILABLE", "INTERNAL", "CIRCUIT_OPEN"} <= used, used
    contract = (ROOT / "docs/protocol.md").read_text(encoding="utf-8")
    missing = sorted(codes[c] for c in used if c in codes and f"`{codes[c]}`" not in contract)
    assert not missing, missing


REFERENCE_PAGES = ("docs/durability.md", "docs/security.md", "docs/architecture.md",
                   "docs/reading.md")
NOT_CODE = {"oms.lock"}  # a file in the data folder, not a module


def test_the_functions_and_tests_the_docs_name_exist() -> None:
    """Crash windows and defects are findable: every ``tests/x.py::test_name``
    and every ``package.module.Name.attr`` that durability.md, security.md
    architecture.md and reading.md name (in backticks) exists."""
    import importlib

    missing = []
    for page in REFERENCE_PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for file, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text):
            if not re.search(rf"^def {name}\(", (ROOT / file).read_text(encoding="utf-8"),
                             flags=re.M):
                missing.append(f"{page}: {file}::{name}")
        named = set(re.findall(
            r"`((?:oms|storage|actors|gateways|bench|console|shards|app)\.[\w.]+)`", text))
        for dotted in sorted(named - NOT_CODE):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{page}: {dotted}")
                break
            else:
                missing.append(f"{page}: {dotted}")
    assert not missing, missing


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_to_a_section_name_a_section_that_exists() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or "#" not in target:
                continue
            name, anchor = target.split("#", 1)
            file = (page.parent / name) if name else page
            if file.suffix == ".md" and file.exists() and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """The README's second command (gates, then tests) is the line .ci/run runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    command = block[1]
    assert "ruff check" in command and "mypy" in command and "pytest" in command, command
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in run, (command, run)
