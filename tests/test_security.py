"""Relay-mode security: TLS, private_key_jwt, and no secret in any log line."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import sys
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from caliper_sidecar.app import start
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, settings_for


def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, made by the test."""
    key = private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "caliper-sidecar test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pem(key))
    return cert_path, key_path


class TestTLS:
    async def test_https_with_tokens(self, platform: RunningFake, tmp_path: Path) -> None:
        """With tls_cert and tls_key the receiver speaks HTTPS only; a plain HTTP request to it
        is answered 400, in plain HTTP, saying to use https:// (not an empty reply)."""
        cert, key = self_signed(tmp_path)
        sidecar = await start(
            settings_for(
                platform,
                tmp_path,
                receiver={"tls_cert": str(cert), "tls_key": str(key), "tokens": ("relay-1",)},
            )
        )
        try:
            assert sidecar.url.startswith("https://")
            trust = ssl.create_default_context(cafile=str(cert))
            events = make_events(2)
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{sidecar.url}/v1/events",
                    json=events,
                    ssl=trust,
                    headers={"Authorization": "Bearer relay-1"},
                ) as resp:
                    assert resp.status == 202
                # plain HTTP to the TLS port: answered in plain HTTP, saying to use https://
                plain = sidecar.url.replace("https", "http")
                async with http.post(f"{plain}/v1/events", json=events) as resp:
                    assert resp.status == 400
                    body = await resp.json()
                port = plain.rsplit(":", 1)[1]
                assert body == {
                    "error": "https_required",
                    "message": f"this port speaks TLS: send to https://127.0.0.1:{port}/ "
                    "(not http://)",
                }
                # and TLS goes on working beside it
                async with http.get(f"{sidecar.url}/healthz", ssl=trust) as resp:
                    assert resp.status == 200
            await platform.fake.wait_for({e["id"] for e in events})
        finally:
            await sidecar.stop()


class TestPrivateKeyJWT:
    async def test_signed_assertion_gets_a_token(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """private_key_jwt: the token request carries an assertion signed with our key."""
        key = private_key()
        platform.fake.client_public_key = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        key_file = tmp_path / "client.pem"
        key_file.write_bytes(pem(key))
        sidecar = await start(
            settings_for(
                platform,
                tmp_path,
                oauth={
                    "auth_method": "private_key_jwt",
                    "private_key_file": str(key_file),
                    "client_secret": "",
                },
            )
        )
        try:
            events = make_events(3)
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{sidecar.url}/v1/events", json=events) as resp,
            ):
                assert resp.status == 202
            await platform.fake.wait_for({e["id"] for e in events})
        finally:
            await sidecar.stop()

    async def test_wrong_key_is_auth_failed(self, platform: RunningFake, tmp_path: Path) -> None:
        platform.fake.client_public_key = (
            private_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        key_file = tmp_path / "client.pem"
        key_file.write_bytes(pem(private_key()))
        sidecar = await start(
            settings_for(
                platform,
                tmp_path,
                oauth={"auth_method": "private_key_jwt", "private_key_file": str(key_file)},
            )
        )
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{sidecar.url}/v1/events", json=make_events(1)) as resp,
            ):
                assert resp.status == 202
            await eventually(lambda: sidecar.dispatcher.state == "auth_failed")
            assert (await sidecar.outbox.stats()).dead_letters == 0
        finally:
            await sidecar.stop()


class TestSecretsNeverLogged:
    async def test_full_run_logs_hold_no_secret(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        """Debug logs of a run that authenticates, refreshes tokens, meets a revoked token,
        refuses wrong tokens and serves admin calls contain no secret, nor check-config."""
        fake = platform.fake
        fake.client_secret = "oauth-secret-d41d8cd98f"
        fake.token_ttl_s = 2
        (tmp_path / "secret").write_text(fake.client_secret + "\n")
        port = free_port()
        config = tmp_path / "c.toml"
        config.write_text(
            f'[receiver]\nport = {port}\ntokens = ["app-token-0cc175b9c0"]\n'
            f'[outbox]\npath = "{tmp_path / "o.db"}"\n'
            f'[upstream]\nendpoint = "{platform.events_url}"\nlinger_ms = 10\n'
            f'[oauth]\ntoken_url = "{platform.token_url}"\nclient_id = "{fake.client_id}"\n'
            f'client_secret_file = "{tmp_path / "secret"}"\n'
            '[admin]\ntoken = "admin-token-92eb5ffee6"\n'
            '[log]\nlevel = "debug"\n'
        )
        p = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(p)
        await p.wait_ready()
        url = f"http://127.0.0.1:{port}"
        app = {"Authorization": "Bearer app-token-0cc175b9c0"}
        async with aiohttp.ClientSession() as http:
            for headers in (app, {"Authorization": "Bearer app-token-wrong"}, {}):
                events = make_events(2)
                async with http.post(f"{url}/v1/events", json=events, headers=headers) as r:
                    await r.read()
            await fake.wait_for(2)
            await asyncio.sleep(1.5)  # past half the token's life: a refresh
            fake.revoke_tokens()
            async with http.post(f"{url}/v1/events", json=make_events(2), headers=app) as r:
                assert r.status == 202
            await fake.wait_for(4)
            for path in ("/v1/status", "/metrics", "/v1/dead-letters"):
                async with http.get(
                    url + path, headers={"Authorization": "Bearer admin-token-92eb5ffee6"}
                ) as r:
                    assert r.status == 200
        assert await p.terminate() == 0
        check = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "caliper_sidecar",
            "check-config",
            "-c",
            str(config),
            stdout=asyncio.subprocess.PIPE,
        )
        printed, _ = await check.communicate()
        logs = p.logs()
        assert p.events().count("token_refreshed") >= 2
        for secret in (
            "oauth-secret-d41d8cd98f",
            "app-token-0cc175b9c0",
            "admin-token-92eb5ffee6",
            *fake.tokens,
        ):
            assert secret not in logs, secret
            assert secret not in printed.decode(), secret
