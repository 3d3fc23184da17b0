"""Tokens and secrets (docs/guarantees.md): blank tokens protect nothing, secrets never show, the
token endpoint's odd requests, and check-config on what run refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar
from caliper_sidecar.codec import utc_from_timestamp
from caliper_sidecar.config import load_settings
from caliper_sidecar.exceptions import ConfigError

from .conftest import (
    StartSidecar,
    eventually,
    make_event,
)


class TestBlankTokensDoNotCount:
    """#7: `tokens = [""]` is no protection, and `Bearer ` (empty) is never accepted."""

    def test_blank_tokens_on_a_network_address_refuse_to_start(self) -> None:
        with pytest.raises(ConfigError, match=r"receiver.tokens"):
            load_settings(
                None,
                environ={"SIDECAR_RECEIVER_HOST": "0.0.0.0", "SIDECAR_RECEIVER_TOKENS": " , "},
            )

    def test_blank_tokens_in_a_file_refuse_to_start(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text('[receiver]\nhost = "0.0.0.0"\ntokens = ["", "  "]\n')
        with pytest.raises(ConfigError, match=r"receiver.tokens"):
            load_settings(config, environ={})

    async def test_empty_bearer_is_refused(self, custom: StartSidecar) -> None:
        _, client = await custom(receiver={"tokens": ("", "real")})
        for header in ("Bearer ", "Bearer", "Bearer    "):
            async with client.post(
                "/v1/events", json=make_event(), headers={"Authorization": header}
            ) as resp:
                assert resp.status == 401, header


class TestSecretsNeverShow:
    """#20 and #17: no repr of any settings section, and no stored answer, shows a secret."""

    def test_section_reprs_mask_secrets(self, tmp_path: Path) -> None:
        settings = load_settings(
            None,
            environ={
                "SIDECAR_OAUTH_CLIENT_SECRET": "s3cret-oauth",
                "SIDECAR_OAUTH_TOKEN_URL": "https://t.test/token",
                "SIDECAR_OAUTH_CLIENT_ID": "c",
                "SIDECAR_RECEIVER_TOKENS": "s3cret-sender-0123",
                "SIDECAR_ADMIN_TOKEN": "s3cret-admin",
                "SIDECAR_UPSTREAM_BEARER_TOKEN": "s3cret-bearer",
            },
        )
        shown = " ".join(
            repr(x)
            for x in (
                settings,
                settings.oauth,
                settings.receiver,
                settings.admin,
                settings.upstream,
                settings.receiver.tokens,
            )
        )
        assert "s3cret" not in shown
        assert settings.oauth.client_secret == "s3cret-oauth"  # still the value

    async def test_token_echoed_by_the_platform_is_redacted(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """A platform that echoes the request's bearer token in its refusal: the token is in
        neither the dead letter nor the log."""
        sidecar, client = await custom()
        event = make_event()
        fake.faults.refuse_ids.add(event["id"])
        original = fake._check

        async def echoing(request: Any) -> Any:
            status, body, headers = await original(request)
            if status == 422:
                body = {"error": "refused", "got": request.headers.get("Authorization")}
            return status, body, headers

        fake._check = echoing
        with capture_logs() as logs:
            async with client.post("/v1/events", json=event) as resp:
                assert resp.status == 202
            await eventually(lambda: _dead(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(10)
        tokens = list(fake.tokens)
        assert tokens
        for token in tokens:
            assert token not in dead.response
            assert token not in repr(logs)
        assert "<redacted>" in dead.response


async def _dead(sidecar: Sidecar) -> bool:
    return bool(await sidecar.outbox.dead_letters(1))


class TestTokenEndpointOddities:
    """#16: a token endpoint's odd answers never break status or delivery."""

    @pytest.mark.parametrize("moment", [1e12 * 3600, 1e20, float("inf"), -1e20])
    def test_far_times_are_shown_not_crashed(self, moment: float) -> None:
        assert utc_from_timestamp(moment) is None or isinstance(utc_from_timestamp(moment), str)

    async def test_huge_expires_in(self, custom: StartSidecar, fake: Any) -> None:
        fake.token_ttl_s = 1e12
        _, client = await custom()
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 202
        await fake.wait_for(1)
        async with client.get("/v1/status") as resp:
            assert resp.status == 200

    async def test_token_with_a_line_break_is_not_kept(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """A token that cannot be sent in a header is refused; the next one is fetched, and
        delivery goes on."""
        fake.faults.token_answers.append(
            {"access_token": "abc\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": 3600}
        )
        _, client = await custom()
        event = make_event()
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]}, timeout=10)


class TestCheckConfig:
    def test_exits_non_zero_on_what_run_refuses(self, tmp_path: Path) -> None:
        """`check-config` fails (exit 2) on a configuration `run` would refuse."""
        config = tmp_path / "c.toml"
        config.write_text('[upstream]\nendpoint = ""\n')
        out = subprocess.run(
            [sys.executable, "-m", "caliper_sidecar", "check-config", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 2
        assert "upstream.endpoint" in out.stderr
