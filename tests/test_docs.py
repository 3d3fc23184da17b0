"""The README and docs/ say what runs: every link between them leads somewhere, every
configuration snippet loads, and every `caliper-sidecar` command line in them parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from caliper_sidecar.cli import _parser
from caliper_sidecar.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[`*_\[\]()]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def blocks(kind: str) -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}#{n}", body)
        for page in PAGES
        for n, (lang, body) in enumerate(FENCE.findall(page.read_text()))
        if lang == kind
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # another site: not checked offline
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.exists() or (goal.suffix == ".md" and anchor not in {"", *anchors(goal)}):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize(("where", "snippet"), blocks("toml"), ids=lambda v: str(v)[:40])
def test_every_configuration_snippet_loads(where: str, snippet: str, tmp_path: Path) -> None:
    """Each TOML snippet is a configuration the sidecar loads: known keys, right types (the
    secrets it would read from files or the environment given as placeholders)."""
    path = tmp_path / "sidecar.toml"
    path.write_text(snippet)
    path.chmod(0o600)
    environ = {
        "SIDECAR_OAUTH_CLIENT_ID": "the-client",
        "SIDECAR_OAUTH_CLIENT_SECRET": "the-secret",
        "SIDECAR_RECEIVER_TOKENS": "a-sender-token-of-16-chars",
    }
    if re.search(r"^tokens(_file)? = ", snippet, re.MULTILINE):
        del environ["SIDECAR_RECEIVER_TOKENS"]
    if re.search(r"^client_secret(_file)? = ", snippet, re.MULTILINE):
        del environ["SIDECAR_OAUTH_CLIENT_SECRET"]
    for file in re.findall(r'_file = "([^"]+)"', snippet):
        snippet = snippet.replace(file, str(tmp_path / Path(file).name))
        (tmp_path / Path(file).name).write_text("a-secret-of-at-least-16-characters\n")
    path.write_text(snippet)
    load_settings(path, environ)


def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for where, body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            command = re.split(r" (?:\||>|&&|;) ", line.split(" #", 1)[0])[0]
            words = shlex.split(command, comments=True)
            while words and (
                words[0] == "sudo" or ("=" in words[0] and not words[0].startswith("-"))
            ):
                words = words[1:]  # sudo, or VARIABLE=value, before the command
            if words and words[0].endswith("caliper-sidecar"):
                found.append((where, words[1:]))
    return found


@pytest.mark.parametrize(("where", "args"), command_lines(), ids=lambda v: str(v)[:50])
def test_every_command_line_parses(where: str, args: list[str]) -> None:
    """Each `caliper-sidecar …` line in the docs is a command and options the CLI takes."""
    _parser().parse_args(args)
