"""The command line as people use it: help everywhere, readable output, clear refusals."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from caliper_sidecar.cli import _parser
from caliper_sidecar.config import OutboxSettings, load_settings
from caliper_sidecar.outbox import NewEvent, SqliteOutbox
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
    async with SqliteOutbox(OutboxSettings(path=str(path))) as box:
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
        async with SqliteOutbox(OutboxSettings(path=str(path))) as box:
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
