"""Configuration: file, environment, secret files, presets, errors that name the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from caliper_sidecar.config import (
    DESTINATION_KEYS,
    REDACTED,
    DestinationSettings,
    OAuthSettings,
    Secret,
    Settings,
    UpstreamSettings,
    destination_env_prefix,
    load_settings,
    redacted,
    render_toml,
    require_upstream,
)
from caliper_sidecar.exceptions import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "sidecar.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return path


class TestSources:
    def test_defaults_without_a_file(self) -> None:
        """With no file and no environment, the built-in defaults of docs/operators.md apply."""
        s = load_settings(None, environ={})
        assert s == Settings()
        assert s.receiver.host == "127.0.0.1"
        assert s.receiver.port == 8787
        assert s.outbox.synchronous == "full"
        assert s.upstream.batch_max_events == 100

    def test_file_values(self, tmp_path: Path) -> None:
        """Values in the TOML file replace the defaults, with their types."""
        path = write(
            tmp_path,
            '[upstream]\nendpoint = "https://x.test/e"\nbatch_max_events = 7\n'
            "[retry]\nmax_backoff_s = 60\n",
        )
        s = load_settings(path, environ={})
        assert s.upstream.endpoint == "https://x.test/e"
        assert s.upstream.batch_max_events == 7
        assert s.retry.max_backoff_s == 60.0
        assert isinstance(s.retry.max_backoff_s, float)

    def test_sidecar_config_variable_names_the_file(self, tmp_path: Path) -> None:
        """SIDECAR_CONFIG is used when no -c is given."""
        path = write(tmp_path, "[receiver]\nport = 9999\n")
        assert load_settings(None, environ={"SIDECAR_CONFIG": str(path)}).receiver.port == 9999

    def test_environment_overrides_the_file(self, tmp_path: Path) -> None:
        """SIDECAR_<SECTION>_<KEY> wins over the file, and is parsed to the key's type."""
        path = write(tmp_path, "[receiver]\nport = 9999\n")
        s = load_settings(
            path,
            environ={
                "SIDECAR_RECEIVER_PORT": "7000",
                "SIDECAR_UPSTREAM_ENDPOINT": "https://env.test/e",
                "SIDECAR_RETRY_INITIAL_BACKOFF_S": "0.5",
                "SIDECAR_RECEIVER_TOKENS": "sender-token-aaaa, sender-token-bbbb",
                "SIDECAR_OUTBOX_MAX_EVENTS": "10",
            },
        )
        assert s.receiver.port == 7000
        assert s.upstream.endpoint == "https://env.test/e"
        assert s.retry.initial_backoff_s == 0.5
        assert s.receiver.tokens == ("sender-token-aaaa", "sender-token-bbbb")
        assert s.outbox.max_events == 10

    def test_secret_from_file(self, tmp_path: Path) -> None:
        """client_secret_file reads the secret from a file (container secrets)."""
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        path = write(
            tmp_path,
            f'[oauth]\ntoken_url = "https://t.test/token"\nclient_id = "c"\n'
            f'client_secret_file = "{secret}"\n',
        )
        assert load_settings(path, environ={}).oauth.client_secret == "s3cret"

    def test_secret_file_from_environment(self, tmp_path: Path) -> None:
        """The *_file keys can be set from the environment too; tokens files hold one a line."""
        tokens = tmp_path / "tokens"
        tokens.write_text("sender-token-one\n\nsender-token-two\n")
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        assert s.receiver.tokens == ("sender-token-one", "sender-token-two")

    def test_example_config_documents_every_key(self) -> None:
        """config/sidecar.example.toml loads and names every key of every section."""
        s = load_settings(EXAMPLE, environ={})
        text = EXAMPLE.read_text()
        for section, table in redacted(s).items():
            if section == "destinations":
                continue  # an array of tables, commented out (TestDestinations)
            assert f"[{section}]" in text
            for key in table:
                assert f"\n{key} =" in text or f"\n# {key} =" in text, f"{section}.{key}"


class TestPresets:
    def test_timeback_preset_fills_endpoints(self) -> None:
        """The timeback preset (LearnWith.AI) fills the SDK's endpoint, token URL, scope, auth
        method and the LearnWith.AI validation profile; it follows no jobs."""
        s = load_settings(
            None,
            environ={
                "SIDECAR_UPSTREAM_PRESET": "timeback",
                "SIDECAR_OAUTH_CLIENT_ID": "c",
                "SIDECAR_OAUTH_CLIENT_SECRET": "s",
            },
        )
        assert s.upstream.endpoint == "https://platform.timeback.com/caliper/v1p2"
        assert s.upstream.platform == "learnwith-ai"
        assert s.upstream.jobs_url == ""
        assert s.oauth.token_url == "https://platform.timeback.com/auth/1.0/token"
        assert s.oauth.scope.endswith("/scope/events.write")
        assert s.oauth.auth_method == "client_secret_basic"
        assert s.validation.profile == "timeback-learnwith"

    @pytest.mark.parametrize(
        ("preset", "host", "cognito"),
        [
            ("timeback-beyond", "caliper.alpha-1edtech.ai", "prod"),
            ("timeback-beyond-staging", "caliper.staging.alpha-1edtech.ai", "staging"),
        ],
    )
    def test_beyond_presets_follow_jobs(self, preset: str, host: str, cognito: str) -> None:
        """The Beyond AI presets fill the SDK's /caliper/event endpoint, its jobs URL and the
        Cognito token URL, with no scope and the default validation profile."""
        s = load_settings(
            None,
            environ={
                "SIDECAR_UPSTREAM_PRESET": preset,
                "SIDECAR_OAUTH_CLIENT_ID": "c",
                "SIDECAR_OAUTH_CLIENT_SECRET": "s",
            },
        )
        assert s.upstream.endpoint == f"https://{host}/caliper/event"
        assert s.upstream.jobs_url == f"https://{host}/jobs/{{id}}/status"
        assert s.oauth.token_url == (
            f"https://{cognito}-beyond-timeback-api-2-idp.auth.us-east-1.amazoncognito.com"
            "/oauth2/token"
        )
        assert s.oauth.scope == ""
        assert s.validation.profile == "timeback"

    def test_staging_and_sandbox_presets(self) -> None:
        """LearnWith.AI's staging and sandbox presets point at their own hosts."""
        env = {"SIDECAR_OAUTH_CLIENT_ID": "c", "SIDECAR_OAUTH_CLIENT_SECRET": "s"}
        staging = load_settings(
            None, environ={**env, "SIDECAR_UPSTREAM_PRESET": "timeback-staging"}
        )
        sandbox = load_settings(
            None, environ={**env, "SIDECAR_UPSTREAM_PRESET": "timeback-sandbox"}
        )
        assert staging.upstream.endpoint == "https://platform.dev.timeback.com/caliper/v1p2"
        assert sandbox.upstream.endpoint == "https://sandbox.platform.timeback.com/caliper/v1p2"

    def test_jobs_url_needs_the_id_placeholder(self) -> None:
        """A jobs URL without {id} is refused by `run`, naming the key."""
        s = load_settings(
            None,
            environ={
                "SIDECAR_UPSTREAM_ENDPOINT": "https://p.test/caliper/event",
                "SIDECAR_UPSTREAM_JOBS_URL": "https://p.test/jobs/status",
            },
        )
        with pytest.raises(ConfigError, match=r"upstream.jobs_url"):
            require_upstream(s)

    def test_explicit_keys_win_over_the_preset(self, tmp_path: Path) -> None:
        """Every preset value is overridable by setting the key."""
        path = write(
            tmp_path,
            '[upstream]\npreset = "timeback-staging"\nendpoint = "https://mine.test/e"\n'
            '[oauth]\nclient_id = "c"\nclient_secret = "s"\nauth_method = "client_secret_post"\n',
        )
        s = load_settings(path, environ={})
        assert s.upstream.endpoint == "https://mine.test/e"
        assert s.oauth.token_url == "https://platform.dev.timeback.com/auth/1.0/token"
        assert s.oauth.auth_method == "client_secret_post"

    def test_unknown_preset(self) -> None:
        with pytest.raises(ConfigError, match=r"upstream.preset 'nope' is unknown"):
            load_settings(None, environ={"SIDECAR_UPSTREAM_PRESET": "nope"})


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[receiver]\nprot = 1\n", "unknown key receiver.prot"),
            ("[recever]\nport = 1\n", r"unknown section \[recever\]"),
            ('[receiver]\nport = "80"\n', "receiver.port must be an integer, got str"),
            ("[receiver]\nport = true\n", "receiver.port must be an integer, not a boolean"),
            ('[receiver]\ntokens = "abc"\n', "receiver.tokens must be an array of strings"),
            ('[outbox]\nsynchronous = "off"\n', "outbox.synchronous must be one of full, normal"),
            ("[upstream]\nconcurrency = 0\n", "upstream.concurrency must be greater than 0"),
            ("[receiver]\nport = 70000\n", "receiver.port must be between 0 and 65535"),
            ("receiver = 3\n", r"\[receiver\] must be a table"),
            ("[receiver\n", "is not valid TOML"),
            ('[oauth]\ntoken_url = "https://t"\nclient_id = "c"\n', "oauth.client_secret"),
            ('[receiver]\ntls_cert = "c.pem"\n', "tls_cert and receiver.tls_key"),
        ],
    )
    def test_file_errors_name_the_key(self, tmp_path: Path, text: str, message: str) -> None:
        """Unknown keys, wrong types and bad values are errors naming the key."""
        with pytest.raises(ConfigError, match=message):
            load_settings(write(tmp_path, text), environ={})

    @pytest.mark.parametrize(
        ("environ", "message"),
        [
            ({"SIDECAR_RECEIVER_PORT": "eighty"}, "SIDECAR_RECEIVER_PORT must be an integer"),
            ({"SIDECAR_UPSTREAM_ENDPONT": "x"}, "unknown key SIDECAR_UPSTREAM_ENDPONT"),
            ({"SIDECAR_NOPE_KEY": "x"}, "unknown environment variable SIDECAR_NOPE_KEY"),
            ({"SIDECAR_RETRY_MAX_BACKOFF_S": "1e"}, "SIDECAR_RETRY_MAX_BACKOFF_S must be a number"),
        ],
    )
    def test_environment_errors_name_the_variable(
        self, environ: dict[str, str], message: str
    ) -> None:
        with pytest.raises(ConfigError, match=message):
            load_settings(None, environ=environ)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="does not exist"):
            load_settings(tmp_path / "nope.toml", environ={})

    def test_secret_and_secret_file_together(self, tmp_path: Path) -> None:
        secret = tmp_path / "s"
        secret.write_text("x")
        with pytest.raises(ConfigError, match="not both"):
            load_settings(
                None,
                environ={
                    "SIDECAR_OAUTH_CLIENT_SECRET": "y",
                    "SIDECAR_OAUTH_CLIENT_SECRET_FILE": str(secret),
                },
            )

    def test_unreadable_secret_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="oauth.client_secret_file: cannot read"):
            load_settings(
                None, environ={"SIDECAR_OAUTH_CLIENT_SECRET_FILE": str(tmp_path / "missing")}
            )

    def test_non_loopback_host_needs_tokens(self) -> None:
        """Listening beyond this machine without receiver.tokens is refused, saying why."""
        with pytest.raises(ConfigError, match="not a loopback address.*receiver.tokens"):
            load_settings(None, environ={"SIDECAR_RECEIVER_HOST": "0.0.0.0"})
        s = load_settings(
            None, environ={"SIDECAR_RECEIVER_HOST": "0.0.0.0", "SIDECAR_RECEIVER_TOKENS": "t" * 16}
        )
        assert s.receiver.host == "0.0.0.0"

    def test_run_needs_an_endpoint(self) -> None:
        with pytest.raises(ConfigError, match="upstream.endpoint is empty"):
            require_upstream(Settings())


class TestRedaction:
    def test_secrets_never_printed(self, tmp_path: Path) -> None:
        """redacted() and the Settings repr hide every secret, and only secrets."""
        s = load_settings(
            None,
            environ={
                "SIDECAR_RECEIVER_TOKENS": "app-token-1-abcdef",
                "SIDECAR_UPSTREAM_BEARER_TOKEN": "bearer-xyz",
                "SIDECAR_OAUTH_TOKEN_URL": "https://t.test/token",
                "SIDECAR_OAUTH_CLIENT_ID": "client-1",
                "SIDECAR_OAUTH_CLIENT_SECRET": "oauth-secret-xyz",
                "SIDECAR_ADMIN_TOKEN": "admin-xyz",
            },
        )
        for text in (render_toml(redacted(s)), repr(s)):
            for secret in ("app-token-1-abcdef", "bearer-xyz", "oauth-secret-xyz", "admin-xyz"):
                assert secret not in text
            assert "client-1" in text
            assert REDACTED in text


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`caliper-sidecar check-config -c PATH` in a subprocess, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "caliper_sidecar", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


class TestCheckConfigCommand:
    def test_prints_effective_config_redacted(self, tmp_path: Path) -> None:
        """`check-config` prints the effective TOML, secrets redacted, and exits 0."""
        path = write(
            tmp_path,
            '[upstream]\npreset = "timeback"\n[oauth]\nclient_id = "c"\n'
            'client_secret = "top-secret"\n',
        )
        out = check_config(path)
        assert out.returncode == 0, out.stderr
        assert "top-secret" not in out.stdout
        assert 'endpoint = "https://platform.timeback.com/caliper/v1p2"' in out.stdout
        assert f'client_secret = "{REDACTED}"' in out.stdout

    def test_says_where_each_value_came_from(self, tmp_path: Path) -> None:
        """Each value that is not a default names its origin: the file, the environment
        variable, the preset, or a secret file."""
        secret = tmp_path / "secret.txt"
        secret.write_text("from-a-file\n")
        path = write(
            tmp_path,
            f'[upstream]\npreset = "timeback-beyond"\n[oauth]\nclient_id = "c"\n'
            f'client_secret_file = "{secret}"\n',
        )
        out = check_config(path, env={**os.environ, "SIDECAR_UPSTREAM_BATCH_MAX_EVENTS": "50"})
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert f'preset = "timeback-beyond"  # file {path}' in lines
        assert "batch_max_events = 50  # environment SIDECAR_UPSTREAM_BATCH_MAX_EVENTS" in lines
        assert any(
            line.startswith("jobs_url = ") and line.endswith("# preset timeback-beyond")
            for line in lines
        )
        assert f'client_secret = "{REDACTED}"  # file {path}, secret file {secret}' in lines
        assert 'platform = "beyond-ai"  # preset timeback-beyond' in lines
        assert "linger_ms = 200" in lines  # a default says nothing
        assert "from-a-file" not in out.stdout

    def test_a_platform_that_does_not_match_its_endpoint_is_a_warning(self, tmp_path: Path) -> None:
        """`upstream.platform` decides the form events leave in; an endpoint whose path is
        another platform's Caliper path passes, with a warning that says so."""
        path = write(
            tmp_path,
            '[upstream]\nplatform = "learnwith-ai"\n'
            'endpoint = "https://caliper.alpha-1edtech.ai/caliper/event"\n',
        )
        out = check_config(path)
        assert out.returncode == 0, out.stderr
        assert "warning: upstream.platform is 'learnwith-ai'" in out.stderr
        assert "/caliper/event" in out.stderr

    def test_an_unknown_platform_is_refused(self, tmp_path: Path) -> None:
        """The platform is one of three names; another is an error naming the key."""
        path = write(tmp_path, '[upstream]\nplatform = "timeback"\n')
        out = check_config(path)
        assert out.returncode == 2
        assert "upstream.platform must be one of learnwith-ai, beyond-ai, caliper" in out.stderr

    def test_wrong_config_exits_non_zero_with_the_key(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[upstream]\nbatch_max_events = -1\n")
        out = check_config(path)
        assert out.returncode == 2
        assert "upstream.batch_max_events must be greater than 0" in out.stderr


class TestServiceLinks:
    @pytest.mark.parametrize(
        "var",
        [
            "SIDECAR_PORT",
            "SIDECAR_SERVICE_HOST",
            "SIDECAR_SERVICE_PORT",
            "SIDECAR_SERVICE_PORT_OPS",
            "SIDECAR_PORT_8787_TCP",
            "SIDECAR_PORT_8787_TCP_PROTO",
            "SIDECAR_PORT_8787_TCP_PORT",
            "SIDECAR_PORT_8787_TCP_ADDR",
        ],
    )
    def test_kubernetes_service_variables_are_not_configuration(self, var: str) -> None:
        """What Kubernetes injects for a Service named `sidecar` is ignored (it stopped the
        sidecar with exit 2), and a misspelt key of ours still is an error."""
        s = load_settings(None, environ={var: "tcp://10.0.0.7:8787"})
        assert s.receiver.port == 8787
        with pytest.raises(ConfigError, match="SIDECAR_RECEIVER_PROT"):
            load_settings(None, environ={var: "x", "SIDECAR_RECEIVER_PROT": "1"})


def test_a_tokens_file_with_three_fields_on_a_line_is_refused(tmp_path: Path) -> None:
    """A tokens file line is a token, or a label and a token: more is a mistake, named."""
    tokens = tmp_path / "tokens"
    tokens.write_text("room-12 sender-token-0123456789\nroom 13 sender-token-abcdefghij\n")
    with pytest.raises(ConfigError, match="line 2: a line is a token, or a label"):
        load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})


class TestTokensFiles:
    """`receiver.tokens_file` and `admin.token_file`: a file that holds no token, and a label
    that is not one, are refused wherever the configuration is read (start, check-config,
    SIGHUP), and the refusal never shows a token."""

    #: tokens as `caliper-sidecar token new` makes them (32 characters)
    A, B, C = (
        "tokenAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "tokenBBBBBBBBBBBBBBBBBBBBBBBBBBB",
        "tokenCCCCCCCCCCCCCCCCCCCCCCCCCCC",
    )

    @pytest.mark.parametrize("text", ["", "\n", "  \n\n\t\n"])
    @pytest.mark.parametrize("key", ["receiver.tokens_file", "admin.token_file"])
    def test_a_token_file_that_holds_no_token_is_refused_naming_the_key(
        self, tmp_path: Path, text: str, key: str
    ) -> None:
        """An empty tokens or admin token file (or one of blank lines) is no protection
        switched on, and does not quietly open the routes it guards: check-config and `run`'s
        settings refuse it, naming the key (exit 2)."""
        section, name = key.split(".")
        secret = tmp_path / "token-file"
        secret.write_text(text)
        path = write(tmp_path, f'[{section}]\n{name} = "{secret}"\n')
        out = check_config(path)
        assert out.returncode == 2
        assert key in out.stderr
        assert "holds no token" in out.stderr
        with pytest.raises(ConfigError, match=key):
            load_settings(path, environ={})

    @pytest.mark.parametrize("key", ["receiver.tokens_file", "admin.token_file"])
    def test_a_secret_file_that_is_not_utf8_is_refused_naming_the_line(
        self, tmp_path: Path, key: str
    ) -> None:
        """A secret file saved in another encoding (Latin-1 from a Windows editor) is refused
        like any other bad configuration: exit 2, the key, the file and the line, no
        traceback, and none of the file's bytes."""
        section, name = key.split(".")
        secret = tmp_path / "token-file"
        secret.write_bytes(f"room-1 {self.A}\n".encode() + b"r\xf6om-2 " + self.B.encode())
        path = write(tmp_path, f'[{section}]\n{name} = "{secret}"\n')
        out = check_config(path)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert f"{key} {secret}, line 2: not UTF-8 text" in out.stderr
        for secret_text in (self.A, self.B, "r\ufffdom"):
            assert secret_text not in out.stderr
        with pytest.raises(ConfigError, match="not UTF-8"):
            load_settings(path, environ={})

    @pytest.mark.parametrize("label", ["room-12", "a.b_c:d-E9", "x" * 32])
    def test_a_label_of_at_most_32_characters_of_the_alphabet_names_the_sender(
        self, tmp_path: Path, label: str
    ) -> None:
        """Labels of letters, digits, `.`, `_`, `:` and `-`, up to 32 of them, are labels."""
        tokens = tmp_path / "tokens"
        tokens.write_text(f"{label} {self.A}\n")
        s = load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        (token,) = s.receiver.tokens
        assert token == self.A
        assert getattr(token, "label", None) == label

    @pytest.mark.parametrize("label", ["x" * 33, "room/12", "röom-12", "room=12", "{room}"])
    def test_any_other_label_is_refused_without_showing_it(
        self, tmp_path: Path, label: str
    ) -> None:
        """A label that breaks the rule is refused with the file, the line, its length and the
        rule, never its text (it may be a secret)."""
        tokens = tmp_path / "tokens"
        tokens.write_text(f"room-1 {self.A}\n{label} {self.B}\n")
        with pytest.raises(ConfigError) as refused:
            load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS_FILE": str(tokens)})
        message = str(refused.value)
        assert f"receiver.tokens_file {tokens}, line 2" in message
        assert f"({len(label)} characters)" in message
        assert "at most 32 characters of A-Z a-z 0-9 . _ : -" in message
        for secret in (label, self.A, self.B):
            assert secret not in message

    @pytest.mark.parametrize("before", ["", "room-2 "], ids=["unlabelled", "labelled"])
    def test_a_line_glued_to_the_one_before_is_refused_without_showing_a_token(
        self, tmp_path: Path, before: str
    ) -> None:
        """A line appended to a file whose last line had lost its final newline is refused by
        check-config (exit 2) naming the line and the likely cause; no token, no label text is
        in its output."""
        tokens = tmp_path / "tokens"
        tokens.write_text(f"room-1 {self.A}\n{before}{self.B}")  # no final newline
        with tokens.open("a") as appended:  # as `token new --label room-3 >> tokens` did
            appended.write(f"room-3 {self.C}\n")
        path = write(tmp_path, f'[receiver]\ntokens_file = "{tokens}"\n')
        out = check_config(path)
        assert out.returncode == 2
        assert f"{tokens}, line 2:" in out.stderr
        assert "did a line lose its final newline" in out.stderr
        assert "caliper-sidecar token new --append" in out.stderr
        for secret in (self.A, self.B, self.C, "room-3"):
            assert secret not in out.stderr + out.stdout


#: an upstream `run` and `check-config` accept, before the destinations of a test
UPSTREAM = '[upstream]\nendpoint = "https://platform.example/caliper/v1p2"\n'
LRS = (
    '[[destinations]]\nname = "district-lrs"\nkind = "caliper"\n'
    'endpoint = "https://lrs.district.example/caliper"\n'
)


def archive(name: str = "archive", directory: str = "archive") -> str:
    """An archive destination's table."""
    return f'[[destinations]]\nname = "{name}"\nkind = "archive"\ndir = "{directory}"\n'


class TestDestinations:
    def test_none_by_default(self) -> None:
        """Without [[destinations]], events go to [upstream] only."""
        assert load_settings(None, environ={}).destinations == ()

    def test_a_caliper_and_an_archive_destination(self, tmp_path: Path) -> None:
        """Each [[destinations]] table is a destination of its kind, in the file's order, its
        keys taking the file's values and the others their defaults."""
        path = write(tmp_path, UPSTREAM + LRS + "linger_ms = 50\n" + archive(directory="/a"))
        lrs, kept = load_settings(path, environ={}).destinations
        assert lrs == DestinationSettings(
            name="district-lrs",
            kind="caliper",
            endpoint="https://lrs.district.example/caliper",
            linger_ms=50,
        )
        assert (kept.name, kept.kind, kept.dir, kept.keep_days) == ("archive", "archive", "/a", 30)

    def test_tuning_defaults_are_the_upstreams(self) -> None:
        """batch_max_events, batch_max_bytes, linger_ms, concurrency and timeout_s default to
        [upstream]'s defaults; when_full to "block"."""
        d = DestinationSettings(name="d", kind="caliper")
        u = UpstreamSettings()
        for key in ("batch_max_events", "batch_max_bytes", "linger_ms", "concurrency", "timeout_s"):
            assert getattr(d, key) == getattr(u, key), key
        assert d.when_full == "block"

    def test_the_sensor_defaults_to_the_upstreams(self, tmp_path: Path) -> None:
        """A caliper destination without a sensor sends under upstream.sensor; its own wins."""
        other = LRS.replace("district-lrs", "other") + 'sensor = "urn:mine"\n'
        path = write(tmp_path, UPSTREAM + 'sensor = "urn:school:1"\n' + LRS + other)
        lrs, mine = load_settings(path, environ={}).destinations
        assert lrs.sensor == "urn:school:1"
        assert mine.sensor == "urn:mine"

    def test_a_bearer_token_from_a_file(self, tmp_path: Path) -> None:
        """bearer_token_file reads the destination's token from a file, as other secrets."""
        secret = tmp_path / "lrs-token"
        secret.write_text("lrs-secret\n")
        path = write(tmp_path, UPSTREAM + LRS + f'bearer_token_file = "{secret}"\n')
        (lrs,) = load_settings(path, environ={}).destinations
        assert lrs.bearer_token == "lrs-secret"
        assert isinstance(lrs.bearer_token, Secret)

    def test_an_oauth_table_shaped_as_oauth(self, tmp_path: Path) -> None:
        """[destinations.oauth] takes the keys of [oauth], client_secret_file included."""
        secret = tmp_path / "client-secret"
        secret.write_text("lrs-client-secret\n")
        path = write(
            tmp_path,
            UPSTREAM + LRS + '[destinations.oauth]\ntoken_url = "https://lrs.example/token"\n'
            f'client_id = "sidecar"\nclient_secret_file = "{secret}"\n'
            'auth_method = "client_secret_post"\n',
        )
        (lrs,) = load_settings(path, environ={}).destinations
        assert lrs.oauth == OAuthSettings(
            token_url="https://lrs.example/token",
            client_id="sidecar",
            client_secret="lrs-client-secret",
            auth_method="client_secret_post",
        )

    def test_a_relative_dir_is_relative_to_the_files_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An archive's relative dir is taken from the configuration file's directory, wherever
        the command runs; an absolute one as it is."""
        (tmp_path / "etc").mkdir()
        path = write(tmp_path / "etc", archive(directory="data/archive") + archive("abs", "/srv/"))
        monkeypatch.chdir("/")
        relative, absolute = load_settings(path, environ={}).destinations
        assert relative.dir == str(tmp_path / "etc" / "data" / "archive")
        assert absolute.dir == "/srv"

    def test_a_relative_dir_from_the_environment_is_relative_to_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A dir set by the environment is not in the file: a relative one is taken from the
        working directory."""
        (tmp_path / "etc").mkdir()
        path = write(tmp_path / "etc", archive())
        monkeypatch.chdir(tmp_path)
        environ = {"SIDECAR_DESTINATIONS_ARCHIVE_DIR": "kept"}
        (kept,) = load_settings(path, environ=environ).destinations
        assert kept.dir == str(tmp_path / "kept")

    def test_the_example_destinations_load_once_uncommented(self, tmp_path: Path) -> None:
        """config/sidecar.example.toml has no destination, and its commented [[destinations]]
        are a caliper destination named district-lrs and an archive, each valid, that show
        every key of their kind."""
        assert load_settings(EXAMPLE, environ={}).destinations == ()
        text = EXAMPLE.read_text()
        block = text[text.index("# [[destinations]]") :].splitlines()
        uncommented = [line.removeprefix("# ") for line in block]
        path = write(tmp_path, "\n".join(line for line in uncommented if line[:1] != "#"))
        lrs, kept = load_settings(path, environ={}).destinations
        assert (lrs.name, lrs.kind, lrs.endpoint) == (
            "district-lrs",
            "caliper",
            "https://lrs.district.example/caliper",
        )
        assert (kept.kind, kept.dir) == ("archive", "/var/lib/caliper-sidecar/archive")
        for kind, keys in DESTINATION_KEYS.items():
            for key in ("name", "kind", *keys):
                assert f"\n# {key} =" in text or f"\n# [destinations.{key}]" in text, (kind, key)


class TestDestinationErrors:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('[destinations]\nname = "a"\n', r"destinations must be an array of tables"),
            ('[[destinations]]\nkind = "archive"\n', r"destinations\[0\].name is required"),
            ('[[destinations]]\nname = "a"\n', r"destinations\[0\].kind is required"),
            (
                '[[destinations]]\nname = "a"\nkind = "lrs"\n',
                r"destinations\[0\].kind must be one of caliper, archive; got 'lrs'",
            ),
            (archive("District LRS"), r"destinations\[0\].name 'District LRS' is not a"),
            (archive("x" * 33), r"destinations\[0\].name 'x{33}' is not a destination name"),
            (archive("upstream"), r'destinations\[0\].name: "upstream" is the \[upstream\]'),
            (
                archive("a", "one") + archive("a", "two"),
                r"destinations\[1\].name 'a' is already the name of destinations\[0\]",
            ),
            (
                '[[destinations]]\nname = "a"\nkind = "caliper"\n',
                r"destinations\[0\].endpoint is required: 'a' is a caliper destination",
            ),
            (
                LRS.replace("https://", "ftp://"),
                r"destinations\[0\].endpoint must be an http\(s\) URL",
            ),
            (
                '[[destinations]]\nname = "a"\nkind = "archive"\n',
                r"destinations\[0\].dir is required: 'a' is an archive destination",
            ),
            (
                LRS + 'dir = "d"\n',
                r"destinations\[0\].dir: a caliper destination \(district-lrs\) takes no dir",
            ),
            (
                archive() + "concurrency = 2\n",
                r"destinations\[0\].concurrency: an archive destination \(archive\) takes no",
            ),
            (
                archive() + '[destinations.oauth]\ntoken_url = "https://t"\n',
                r"destinations\[0\].oauth: an archive destination \(archive\) takes no oauth",
            ),
            (LRS + "endpont = 1\n", r"unknown key destinations\[0\].endpont"),
            (
                LRS + '[destinations.oauth]\nsecret = "s"\n',
                r"unknown key destinations\[0\].oauth.secret",
            ),
            (
                archive() + archive("b") + 'keep_days = "7"\n',
                r"destinations\[1\].keep_days must be an integer, got str",
            ),
            (LRS + "concurrency = 0\n", r"destinations\[0\].concurrency must be greater than 0"),
            (
                LRS + 'when_full = "drop"\n',
                r"destinations\[0\].when_full must be one of block, dead_letter",
            ),
            (
                LRS + '[destinations.oauth]\ntoken_url = "https://t"\n',
                r"destinations\[0\].oauth.client_id is required",
            ),
            (
                LRS + 'bearer_token = "b"\n[destinations.oauth]\ntoken_url = "https://t"\n'
                'client_id = "c"\nclient_secret = "s"\n',
                r"set destinations\[0\].bearer_token or destinations\[0\].oauth.token_url",
            ),
            (
                archive("a", "/srv/kept") + archive("b", "/srv/kept/"),
                r"destinations\[1\].dir is also destinations\[0\].dir",
            ),
        ],
    )
    def test_file_errors_name_the_key(self, tmp_path: Path, text: str, message: str) -> None:
        """Each mistake in a destination is an error naming its key, by the destination's
        index in the file (and its name where it has one)."""
        with pytest.raises(ConfigError, match=message):
            load_settings(write(tmp_path, UPSTREAM + text), environ={})

    @pytest.mark.parametrize(
        ("key", "message"),
        [
            ("bearer_token_file", r"destinations\[0\].bearer_token_file: cannot read"),
            ("oauth_client_secret_file", r"destinations\[0\].oauth.client_secret_file: cannot"),
        ],
    )
    def test_a_missing_secret_file(self, tmp_path: Path, key: str, message: str) -> None:
        """A destination's secret file that cannot be read is an error naming its key."""
        missing = tmp_path / "missing"
        if key.startswith("oauth_"):
            text = (
                '[destinations.oauth]\ntoken_url = "https://t"\nclient_id = "c"\n'
                f'client_secret_file = "{missing}"\n'
            )
        else:
            text = f'{key} = "{missing}"\n'
        with pytest.raises(ConfigError, match=message):
            load_settings(write(tmp_path, UPSTREAM + LRS + text), environ={})

    def test_a_bearer_token_file_that_holds_no_token(self, tmp_path: Path) -> None:
        """An empty bearer_token_file (one caught while it is rewritten) is refused, not taken
        for no token."""
        empty = tmp_path / "empty"
        empty.write_text("\n")
        path = write(tmp_path, UPSTREAM + LRS + f'bearer_token_file = "{empty}"\n')
        with pytest.raises(ConfigError, match=r"destinations\[0\].bearer_token_file .* holds no"):
            load_settings(path, environ={})

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            ('[[destinations]]\nname = "lrs"\nkind = "lrs"\n', "destinations[0].kind must be"),
            (LRS + archive("district-lrs"), "destinations[1].name 'district-lrs' is already"),
            (archive("upstream"), 'destinations[0].name: "upstream"'),
            ('[[destinations]]\nname = "lrs"\nkind = "caliper"\n', "destinations[0].endpoint"),
            (LRS + 'bearer_token_file = "/nonexistent/token"\n', "bearer_token_file: cannot"),
            (archive() + "frequency = 1\n", "unknown key destinations[0].frequency"),
            (archive() + "keep_days = -1\n", "destinations[0].keep_days must not be negative"),
        ],
    )
    def test_check_config_exits_2_naming_the_key(
        self, tmp_path: Path, text: str, says: str
    ) -> None:
        """`check-config` refuses a wrong destination with exit 2 and the key, no traceback."""
        out = check_config(write(tmp_path, UPSTREAM + text))
        assert out.returncode == 2, out.stdout
        assert says in out.stderr
        assert "Traceback" not in out.stderr

    def test_check_config_refuses_an_archive_dir_it_cannot_create(self, tmp_path: Path) -> None:
        """An archive dir whose nearest existing ancestor is no writable directory (here a
        file) is refused by `check-config` as by `run` (exit 2), naming the key."""
        (tmp_path / "a-file").write_text("not a directory")
        out = check_config(write(tmp_path, UPSTREAM + archive(directory="a-file/archive")))
        assert out.returncode == 2
        assert f"destinations[0].dir {tmp_path}/a-file/archive cannot be created" in out.stderr
        assert f"{tmp_path}/a-file is not a directory" in out.stderr

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes any directory")
    def test_check_config_refuses_an_archive_dir_it_cannot_write(self, tmp_path: Path) -> None:
        """An archive dir in a directory this user cannot write is refused, naming the key."""
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = check_config(write(tmp_path, UPSTREAM + archive(directory="locked/archive")))
        assert out.returncode == 2
        assert "destinations[0].dir" in out.stderr
        assert "this user cannot write there" in out.stderr

    def test_an_archive_dir_that_is_a_file(self, tmp_path: Path) -> None:
        """An archive dir that exists and is a file is refused by `check-config`."""
        (tmp_path / "archive").write_text("not a directory")
        out = check_config(write(tmp_path, UPSTREAM + archive()))
        assert out.returncode == 2
        assert f"destinations[0].dir {tmp_path}/archive is not a directory" in out.stderr


class TestDestinationEnvironment:
    def test_overrides_a_key_of_a_destination_by_its_name(self, tmp_path: Path) -> None:
        """SIDECAR_DESTINATIONS_<NAME>_<KEY>, the name upper-cased with "-" as "_", overrides
        that destination's key; OAUTH_<KEY> a key of its oauth table."""
        path = write(tmp_path, UPSTREAM + LRS + archive())
        s = load_settings(
            path,
            environ={
                "SIDECAR_DESTINATIONS_DISTRICT_LRS_BEARER_TOKEN": "from-the-environment",
                "SIDECAR_DESTINATIONS_DISTRICT_LRS_CONCURRENCY": "8",
                "SIDECAR_DESTINATIONS_DISTRICT_LRS_OAUTH_SCOPE": "events.write",
                "SIDECAR_DESTINATIONS_ARCHIVE_KEEP_DAYS": "0",
            },
        )
        lrs, kept = s.destinations
        assert lrs.bearer_token == "from-the-environment"
        assert lrs.concurrency == 8
        assert lrs.oauth.scope == "events.write"
        assert kept.keep_days == 0

    def test_a_secret_file_from_the_environment(self, tmp_path: Path) -> None:
        """<KEY>_FILE works for a destination's secrets as for a section's."""
        secret = tmp_path / "token"
        secret.write_text("lrs-token-from-a-file\n")
        path = write(tmp_path, UPSTREAM + LRS)
        environ = {"SIDECAR_DESTINATIONS_DISTRICT_LRS_BEARER_TOKEN_FILE": str(secret)}
        (lrs,) = load_settings(path, environ=environ).destinations
        assert lrs.bearer_token == "lrs-token-from-a-file"

    def test_the_name_the_rest_is_a_key_of_wins(self, tmp_path: Path) -> None:
        """Of two names that both begin a variable ("lrs" and "lrs-oauth"), the one after which
        the rest is a key is meant."""
        other = LRS.replace("district-lrs", "lrs-oauth")
        path = write(tmp_path, UPSTREAM + LRS.replace("district-lrs", "lrs") + other)
        environ = {
            "SIDECAR_DESTINATIONS_LRS_OAUTH_SCOPE": "s",
            "SIDECAR_DESTINATIONS_LRS_OAUTH_LINGER_MS": "7",
        }
        lrs, lrs_oauth = load_settings(path, environ=environ).destinations
        assert (lrs.oauth.scope, lrs.linger_ms) == ("s", 200)
        assert (lrs_oauth.oauth.scope, lrs_oauth.linger_ms) == ("", 7)

    @pytest.mark.parametrize(
        ("environ", "message"),
        [
            (
                {"SIDECAR_DESTINATIONS_SCHOOL_LRS_ENDPOINT": "https://x"},
                r"SIDECAR_DESTINATIONS_SCHOOL_LRS_ENDPOINT names no destination of the "
                r"configuration file \(defined there: district-lrs, archive\)",
            ),
            (
                {"SIDECAR_DESTINATIONS_DISTRICT_LRS_ENDPONT": "x"},
                "unknown key SIDECAR_DESTINATIONS_DISTRICT_LRS_ENDPONT",
            ),
            (
                {"SIDECAR_DESTINATIONS_ARCHIVE_ENDPOINT": "https://x"},
                r"SIDECAR_DESTINATIONS_ARCHIVE_ENDPOINT: an archive destination \(archive\)",
            ),
            (
                {"SIDECAR_DESTINATIONS_DISTRICT_LRS_LINGER_MS": "soon"},
                "SIDECAR_DESTINATIONS_DISTRICT_LRS_LINGER_MS must be an integer",
            ),
            (
                {"SIDECAR_DESTINATIONS_DISTRICT_LRS_KIND": "archive"},
                "SIDECAR_DESTINATIONS_DISTRICT_LRS_KIND: a destination's kind is set in the file",
            ),
        ],
    )
    def test_errors_name_the_variable(
        self, tmp_path: Path, environ: dict[str, str], message: str
    ) -> None:
        """A variable naming a destination the file does not define, a key it does not have
        or a wrong value is an error naming the variable."""
        path = write(tmp_path, UPSTREAM + LRS + archive())
        with pytest.raises(ConfigError, match=message):
            load_settings(path, environ=environ)

    def test_without_a_file_no_destination_can_be_named(self) -> None:
        """Destinations are defined in the file only: the environment alone names none."""
        with pytest.raises(ConfigError, match="defined there: none"):
            load_settings(None, environ={"SIDECAR_DESTINATIONS_ARCHIVE_DIR": "/srv/archive"})

    def test_kubernetes_service_variables_are_still_ignored(self, tmp_path: Path) -> None:
        """Service-link variables stay out of the way of destinations."""
        path = write(tmp_path, UPSTREAM + archive())
        environ = {"SIDECAR_PORT": "tcp://10.0.0.7:8787", "SIDECAR_SERVICE_HOST": "10.0.0.7"}
        assert len(load_settings(path, environ=environ).destinations) == 1

    def test_destination_env_prefix(self) -> None:
        """The variables of a destination begin with its name, upper case, "-" as "_"."""
        assert destination_env_prefix("district-lrs") == "SIDECAR_DESTINATIONS_DISTRICT_LRS_"


class TestDestinationsInCheckConfig:
    def test_each_destination_with_its_origins_secrets_redacted(self, tmp_path: Path) -> None:
        """`check-config` prints each destination as a [[destinations]] table with the keys of
        its kind, each value's origin, secrets redacted, and what a change of one needs."""
        secret = tmp_path / "lrs-token"
        secret.write_text("lrs-token-from-a-file\n")
        path = write(
            tmp_path,
            UPSTREAM
            + LRS
            + f'bearer_token_file = "{secret}"\n'
            + archive()
            + LRS.replace("district-lrs", "oauth-lrs")
            + '[destinations.oauth]\ntoken_url = "https://t.example/token"\nclient_id = "c"\n'
            'client_secret = "oauth-secret-in-the-file"\n',
        )
        env = {**os.environ, "SIDECAR_DESTINATIONS_DISTRICT_LRS_CONCURRENCY": "8"}
        out = check_config(path, env=env)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        first = lines.index("[[destinations]]")
        assert "needs a restart" in lines[first - 1]
        last = lines.index(next(line for line in lines if line.startswith("# a SIGHUP applies")))
        assert lines[first:last] == (
            [
                "[[destinations]]",
                f'name = "district-lrs"  # file {path}',
                f'kind = "caliper"  # file {path}',
                f'endpoint = "https://lrs.district.example/caliper"  # file {path}',
                f'bearer_token = "{REDACTED}"  # file {path}, secret file {secret}',
                'sensor = ""',
                "batch_max_events = 100",
                "batch_max_bytes = 512000",
                "linger_ms = 200",
                "concurrency = 8  # environment SIDECAR_DESTINATIONS_DISTRICT_LRS_CONCURRENCY",
                "timeout_s = 30",
                'when_full = "block"',
                "",
                "[[destinations]]",
                f'name = "archive"  # file {path}',
                f'kind = "archive"  # file {path}',
                f'dir = "{tmp_path}/archive"  # file {path}',
                "keep_days = 30",
                "",
                "[[destinations]]",
                f'name = "oauth-lrs"  # file {path}',
                f'kind = "caliper"  # file {path}',
                f'endpoint = "https://lrs.district.example/caliper"  # file {path}',
                'bearer_token = ""',
                'sensor = ""',
                "batch_max_events = 100",
                "batch_max_bytes = 512000",
                "linger_ms = 200",
                "concurrency = 4",
                "timeout_s = 30",
                'when_full = "block"',
                "",
                "[destinations.oauth]",
                f'token_url = "https://t.example/token"  # file {path}',
                f'client_id = "c"  # file {path}',
                f'client_secret = "{REDACTED}"  # file {path}',
                'scope = ""',
                'auth_method = "client_secret_basic"',
                'private_key_file = ""',
                "refresh_leeway_s = 60",
            ]
        )
        assert "lrs-token-from-a-file" not in out.stdout + out.stderr
        assert "oauth-secret-in-the-file" not in out.stdout + out.stderr
        assert f"{path} holds secrets and others can read it" in out.stderr

    def test_redacted_and_repr_hide_destination_secrets(self, tmp_path: Path) -> None:
        """redacted() and the Settings repr hide a destination's bearer token and client
        secret, and only those."""
        path = write(
            tmp_path,
            UPSTREAM
            + LRS
            + 'bearer_token = "lrs-bearer-xyz"\n'
            + LRS.replace("district-lrs", "oauth-lrs")
            + '[destinations.oauth]\ntoken_url = "https://t.example/token"\nclient_id = "c-1"\n'
            'client_secret = "lrs-oauth-xyz"\n',
        )
        s = load_settings(path, environ={})
        for text in (render_toml(redacted(s)), repr(s), repr(s.destinations)):
            assert "lrs-bearer-xyz" not in text
            assert "lrs-oauth-xyz" not in text
            assert "c-1" in text
        assert redacted(s)["destinations"][0]["bearer_token"] == REDACTED
        assert redacted(s)["destinations"][1]["oauth"]["client_secret"] == REDACTED


class TestPathsRelativeToTheFile:
    """Relative paths in the file are relative to its directory, so any command given `-c`
    finds the same files from anywhere; the environment's stay relative to the working
    directory; the default outbox of a configuration given by file is beside the file."""

    def test_the_files_paths_and_the_default_outbox(self, tmp_path: Path) -> None:
        (tmp_path / "conf").mkdir()
        (tmp_path / "conf" / "tokens").write_text("room-1 a-sender-token-0123456789\n")
        path = tmp_path / "conf" / "sidecar.toml"
        path.write_text(
            '[receiver]\ntokens_file = "tokens"\ntls_cert = "tls/cert.pem"\ntls_key = "k.pem"\n'
        )
        s = load_settings(path, environ={})
        assert s.outbox.path == str(tmp_path / "conf" / "data" / "outbox.db")
        assert s.receiver.tls_cert == str(tmp_path / "conf" / "tls" / "cert.pem")
        assert s.receiver.tokens == ("a-sender-token-0123456789",)
        from_env = load_settings(path, environ={"SIDECAR_OUTBOX_PATH": "here.db"})
        assert from_env.outbox.path == "here.db"
        assert load_settings(None, environ={}).outbox.path == "data/outbox.db"

    def test_a_destinations_files(self, tmp_path: Path) -> None:
        (tmp_path / "token").write_text("lrs-token-0123456789\n")
        path = write(
            tmp_path,
            UPSTREAM + LRS + 'bearer_token_file = "token"\n' + archive(directory="kept"),
        )
        lrs, kept = load_settings(path, environ={}).destinations
        assert lrs.bearer_token == "lrs-token-0123456789"
        assert kept.dir == str(tmp_path / "kept")

    def test_outbox_stats_finds_the_outbox_from_anywhere(self, tmp_path: Path) -> None:
        """The paper cut: `outbox stats -c /etc/…` run in another directory found no outbox."""
        path = write(tmp_path, '[outbox]\npath = "box/outbox.db"\n' + UPSTREAM)
        made = subprocess.run(
            [sys.executable, "-m", "caliper_sidecar", "outbox", "stats", "--json", "-c", str(path)],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        assert made.returncode == 1, made.stderr  # no outbox yet: said, with its full path
        assert str(tmp_path / "box" / "outbox.db") in made.stderr


class TestDidYouMean:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('[upstream]\nendpont = "x"\n', "unknown key upstream.endpont; did you mean endpoint?"),
            ("[reciever]\nport = 1\n", "unknown section [reciever]; did you mean receiver?"),
            (
                '[oauth]\nclient_secert_file = "x"\n',
                "unknown key oauth.client_secert_file; did you mean client_secret_file?",
            ),
            (
                '[[destinations]]\nname = "a"\nkind = "caliper"\nendpiont = "https://a/c"\n',
                "did you mean endpoint?",
            ),
            ("[log]\nfromat = 1\n", "unknown key log.fromat; did you mean format?"),
        ],
    )
    def test_a_mistyped_key_gets_a_suggestion(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_settings(write(tmp_path, text), environ={})

    def test_no_suggestion_for_what_resembles_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as raised:
            load_settings(write(tmp_path, "[upstream]\nzzz = 1\n"), environ={})
        assert "did you mean" not in str(raised.value)
