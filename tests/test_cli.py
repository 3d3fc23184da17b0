"""The command line as people use it: help everywhere, readable output, clear refusals."""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import stat
from pathlib import Path

import pytest

from caliper_sidecar.cli import GC_YOUNG_THRESHOLD, _collect_less, _parser
from caliper_sidecar.config import OutboxSettings, load_settings
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.tools.validate import wants_colour

from .conftest import cli, new_id


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += parsers(child)
    return found


class TestHelp:
    def test_every_command_and_option_explains_itself(self) -> None:
        """No option without help text; the configuration option names the environment."""
        for parser in parsers(_parser()):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                    continue
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
                if "--config" in action.option_strings:
                    assert "SIDECAR_" in action.help

    def test_purge_all_warns(self) -> None:
        (purge,) = [p for p in parsers(_parser()) if p.prog.endswith("dead-letters purge")]
        (every,) = [a for a in purge._actions if "--all" in a.option_strings]
        assert every.help is not None
        assert "WARNING" in every.help

    @pytest.mark.parametrize("group", ["outbox", "dead-letters"])
    async def test_a_group_without_an_action_prints_its_help(self, group: str) -> None:
        code, out, _ = await cli(group)
        assert code == 2
        assert f"usage: caliper-sidecar {group}" in out
        assert "ACTION" in out


@pytest.fixture
async def config(tmp_path: Path) -> Path:
    """A configuration naming an outbox with two waiting events and one dead letter."""
    path = tmp_path / "outbox.db"
    async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
        await box.append([NewEvent(new_id(), b"{}") for _ in range(3)])
        batch = await box.claim_batch(1, 10_000)
        await box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
    file = tmp_path / "c.toml"
    file.write_text(f'[outbox]\npath = "{path}"\n')
    return file


class TestOutput:
    async def test_stats_for_people_and_for_machines(self, config: Path) -> None:
        """Lines for people, JSON with --json; times as ISO 8601 in both."""
        code, out, _ = await cli("outbox", "stats", "-c", str(config))
        assert code == 0
        lines = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines()}
        assert lines["events"] == "2"
        assert lines["oldest received at"].endswith("Z")
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        stats = json.loads(out)
        assert stats["events"] == 2
        assert stats["oldest_received_at"].endswith("Z")

    async def test_dead_letter_times_are_iso(self, config: Path) -> None:
        _, out, _ = await cli("dead-letters", "list", "--json", "-c", str(config))
        (letter,) = [json.loads(line) for line in out.splitlines()]
        assert letter["dead_lettered_at"].endswith("Z")
        assert letter["received_at"].endswith("Z")

    async def test_dead_letters_as_json_lines_hold_the_event_on_one_line(
        self, tmp_path: Path
    ) -> None:
        """`--json` writes JSON Lines: an event stored as an SDK sent it (pretty-printed, a
        number no float holds) is one line, its values as stored."""
        path = tmp_path / "outbox.db"
        stored = b'{\n  "id": "x",\n  "big": 123456789012345678901234567890\n}'
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            await box.append([NewEvent(new_id(), stored)])
            batch = await box.claim_batch(1, 10_000)
            await box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
        (tmp_path / "c.toml").write_text(f'[outbox]\npath = "{path}"\n')
        _, out, _ = await cli("dead-letters", "list", "--json", "-c", str(tmp_path / "c.toml"))
        (letter,) = [json.loads(line) for line in out.splitlines()]
        assert letter["event"] == {"id": "x", "big": 123456789012345678901234567890}

    async def test_unknown_ids_are_named(self, config: Path) -> None:
        """Replaying or purging ids that are not dead letters says which, and exits 1."""
        ghost = new_id()
        code, out, err = await cli("dead-letters", "purge", ghost, "-c", str(config))
        assert code == 1
        assert ghost in err
        assert "purged 0" in out


class TestColour:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def test_no_color_is_honoured(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert wants_colour(self.Terminal())
        assert not wants_colour(io.StringIO())
        monkeypatch.setenv("NO_COLOR", "1")
        assert not wants_colour(self.Terminal())


class TestTokenNew:
    async def test_a_new_token_goes_into_the_tokens_file_as_printed(self, tmp_path: Path) -> None:
        """`token new --label L` prints `L <token>` (192 random bits); appended to the tokens
        file, the token is accepted and the label is not part of it."""
        code, out, err = await cli("token", "new", "--label", "room-12")
        assert code == 0, err
        label, token = out.split()
        assert label == "room-12"
        assert len(token) >= 32
        assert "receiver.tokens_file" in err
        code, plain, _ = await cli("token", "new")
        assert len(plain.split()) == 1
        assert plain.strip() != token
        tokens = tmp_path / "tokens"
        tokens.write_text(out + plain)
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        assert s.receiver.tokens == (token, plain.strip())

    async def test_a_label_is_one_word(self) -> None:
        code, _, err = await cli("token", "new", "--label", "room 12")
        assert code == 2
        assert "one word" in err

    @pytest.mark.parametrize("label", ["x" * 33, "room/12", "röom-12"])
    async def test_a_label_follows_the_tokens_files_rule(self, tmp_path: Path, label: str) -> None:
        """`--label` takes what a tokens file takes (at most 32 characters of A-Z a-z 0-9 . _ :
        -): anything else exits 2, printing no token and leaving the file as it was."""
        tokens = tmp_path / "tokens"
        tokens.write_text("room-1 sender-token-0123456789\n")
        for append in ([], ["--append", str(tokens)]):
            code, out, err = await cli("token", "new", "--label", label, *append)
            assert code == 2
            assert "at most 32 characters of A-Z a-z 0-9 . _ : -" in err
            assert out == ""
        assert tokens.read_text() == "room-1 sender-token-0123456789\n"

    async def test_append_adds_a_line_even_to_a_file_without_a_final_newline(
        self, tmp_path: Path
    ) -> None:
        """`token new --label L --append FILE` on a file whose last line has no final newline
        leaves two lines the sidecar loads with both labels, the file owner-only (0600); the
        token is printed once, alone on stdout, and stderr names the file."""
        old = "sender-token-0123456789abcdef"
        tokens = tmp_path / "tokens"
        tokens.write_text(f"room-1 {old}")  # no final newline
        tokens.chmod(0o644)
        code, out, err = await cli("token", "new", "--label", "room-2", "--append", str(tokens))
        assert code == 0, err
        new = out.strip()
        assert out == f"{new}\n"
        assert len(new) >= 32
        assert tokens.read_text() == f"room-1 {old}\nroom-2 {new}\n"
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
        assert str(tokens) in err
        assert new not in err
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        assert s.receiver.tokens == (old, new)
        assert [getattr(t, "label", None) for t in s.receiver.tokens] == ["room-1", "room-2"]
        assert os.listdir(tmp_path) == ["tokens"]  # no temporary file left beside it

    async def test_append_creates_a_missing_tokens_file_owner_only(self, tmp_path: Path) -> None:
        """`--append` to a file that does not exist yet creates it, mode 0600, with the line."""
        tokens = tmp_path / "tokens"
        code, out, err = await cli("token", "new", "--append", str(tokens))
        assert code == 0, err
        assert tokens.read_text() == out
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        assert s.receiver.tokens == (out.strip(),)

    async def test_appends_at_once_each_keep_their_line(self, tmp_path: Path) -> None:
        """A provisioning script making a token per room in parallel (`xargs -P`): every
        `--append` that printed a token left it in the file (each rewrites the whole file,
        so two at once used to keep only the later one's)."""
        tokens = tmp_path / "tokens"
        rooms = [f"room-{n}" for n in range(12)]
        runs = await asyncio.gather(
            *(cli("token", "new", "--label", room, "--append", str(tokens)) for room in rooms)
        )
        assert all(code == 0 for code, _, _ in runs), [err for _, _, err in runs]
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        assert sorted(s.receiver.tokens) == sorted(out.strip() for _, out, _ in runs)
        assert os.listdir(tmp_path) == ["tokens"]  # nothing left beside it


def test_run_collects_garbage_as_a_server_does() -> None:
    """`run` freezes what is loaded at start and collects the young generation in larger
    batches (cli._collect_less; BENCHMARKS.md: +3 to +5 % single-event ingest)."""
    before = gc.get_threshold()
    try:
        _collect_less()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
