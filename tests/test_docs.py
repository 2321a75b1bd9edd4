"""The README and docs/ as a newcomer follows them: every link leads to a file and heading that exist, and every
command they show still runs (each module and script answers ``--help``; each make target and shell script
exists)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' line in a code block is no heading
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_link_in_the_docs_leads_somewhere():
    assert len(PAGES) > 5 and not broken_links(PAGES), broken_links(PAGES)


def test_the_link_check_sees_a_missing_file_and_heading(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# A page\n\n[ok](a.md#a-page) [gone](b.md) [nowhere](#no-such) [web](https://x.org)\n")
    assert broken_links([page]) == ["a.md: b.md (no such file)", "a.md: #no-such (no such heading)"]


def _commands() -> tuple[set[str], set[str], set[str], set[str]]:
    """(modules run with python -m, Python scripts, make targets, shell scripts) the pages show."""
    text = "\n".join(page.read_text() for page in PAGES)
    modules = set(re.findall(r"python -m (fastclip[\w.]*)", text))
    scripts = set(re.findall(r"python ((?:fastclip|benchmarks)/[\w/]+\.py)", text))
    targets = set(re.findall(r"`make (\w+)", text)) | set(re.findall(r"^make (\w+)", text, re.M))
    shells = set(re.findall(r"(benchmarks/\w+\.sh)", text))
    return modules, scripts, targets, shells


def test_every_command_in_the_docs_still_runs():
    modules, scripts, targets, shells = _commands()
    assert {"fastclip.train", "fastclip.data.shards", "fastclip.export"} <= modules and {"demo", "test"} <= targets
    makefile = (ROOT / "Makefile").read_text()
    assert not [t for t in targets if not re.search(rf"^{t}:", makefile, re.M)], targets
    for shell in shells:
        assert subprocess.run(["bash", "-n", str(ROOT / shell)]).returncode == 0, shell
    # one process for every --help: each module imported once, not a fresh torch import per command
    code = (
        "import runpy, sys\n"
        "failed = []\n"
        "for kind, name in [*(('m', m) for m in sys.argv[1].split()), *(('s', s) for s in sys.argv[2].split())]:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        run = runpy.run_module if kind == 'm' else runpy.run_path\n"
        "        run(name, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None): failed.append(f'{name}: exit {e.code}')\n"
        "    else:\n"
        "        failed.append(f'{name}: --help did not exit')\n"
        "print('FAILED', failed)\n"
    )  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, " ".join(sorted(modules)), " ".join(sorted(scripts))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "FAILED []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_readme_stays_a_front_door():
    """The README short enough to read first (torchtitan's pattern), the detail in docs/, each page linked."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert not [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
