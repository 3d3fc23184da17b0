"""Every check `run` makes at start, `check-config` makes too, with the same exit status (2)
and the same warnings (docs/guarantees.md): the real CLI in a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import cli

UPSTREAM = '[upstream]\nendpoint = "https://platform.example/caliper/event"\n'


def config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(UPSTREAM + text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '[receiver]\ntls_cert = "/nonexistent/cert.pem"\ntls_key = "/nonexistent/key.pem"\n',
            "receiver.tls_cert / receiver.tls_key cannot be loaded",
        ),
        (
            '[oauth]\ntoken_url = "https://t.example/token"\nclient_id = "c"\n'
            'auth_method = "private_key_jwt"\nprivate_key_file = "/nonexistent/key.pem"\n',
            "oauth.private_key_file cannot be read",
        ),
        ('[outbox]\nurl = "postgresql://u@127.0.0.1:99999/db"\n', "outbox.url does not parse"),
        ('[outbox]\nurl = "postgresql://u@[::1/db"\n', "outbox.url does not parse"),
        ('[outbox]\nurl = "mysql://u@127.0.0.1/db"\n', "outbox.url must start with postgresql"),
        ('[outbox]\npath = "{tmp}/a-file/outbox.db"\n', "cannot create it"),
        (
            '[[destinations]]\nname = "kept"\nkind = "archive"\ndir = "a-file/archive"\n',
            "destinations[0].dir {tmp}/a-file/archive cannot be created",
        ),
    ],
)
async def test_check_config_refuses_what_run_refuses(tmp_path: Path, text: str, says: str) -> None:
    """Missing TLS files, an unreadable private key, an outbox URL with a bad port, a broken
    IPv6 host or another scheme, an outbox or archive directory that cannot be created:
    `check-config` and `run` both exit 2 with the same message, and no traceback."""
    (tmp_path / "a-file").write_text("not a directory")
    path = config(tmp_path, text.replace("{tmp}", str(tmp_path)))
    for command in ("check-config", "run"):
        code, _, err = await cli(command, "-c", str(path))
        assert (code, command) == (2, command), err
        assert says.replace("{tmp}", str(tmp_path)) in err
        assert "Traceback" not in err
        assert "99999" not in err or "port" in err


async def test_secrets_others_can_read_are_a_warning(tmp_path: Path) -> None:
    """A configuration file holding a secret that others can read is a warning, with the fix,
    from `check-config`; the same file at 0600 is not."""
    secret = '[oauth]\ntoken_url = "https://t.example/token"\nclient_id = "c"\n'
    secret += 'client_secret = "top-secret"\n'
    path = config(tmp_path, secret, mode=0o644)
    code, _, err = await cli("check-config", "-c", str(path))
    assert code == 0
    assert f"{path} holds secrets and others can read it" in err
    assert f"chmod 600 {path}" in err
    path.chmod(0o600)
    _, _, err = await cli("check-config", "-c", str(path))
    assert "others can read it" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is about running as root")
async def test_running_as_root_is_a_warning(tmp_path: Path) -> None:
    """Running as root is said at start, with what to do instead."""
    _, _, err = await cli("check-config", "-c", str(config(tmp_path, "")))
    assert "running as root" in err


def test_a_postgres_outbox_without_its_driver_says_which_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncpg comes with the `postgres` extra only: an outbox.url without it is a
    configuration error that names the extra (as if it were not installed)."""
    import importlib.util

    from caliper_sidecar.exceptions import ConfigError
    from caliper_sidecar.preflight import check_postgres_url

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name)
    )
    with pytest.raises(ConfigError, match=r"caliper-sidecar\[postgres\]"):
        check_postgres_url("postgresql://u@127.0.0.1/db")
