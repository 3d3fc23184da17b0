"""The yardsticks the sidecar is measured against, each a small aiohttp server:

    python bench/servers.py bare  --port P          parse the JSON, answer 202, store nothing
    python bench/servers.py naive --port P --db F   one SQLite transaction per request
    python bench/servers.py sink  --port P          count the events of posted envelopes

`bare` is the HTTP ceiling on this machine; `naive` is the design the group commit replaces;
`sink` is the platform both forwarders send to in bench/forward.py (GET /count: how many).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator

import aiosqlite
from aiohttp import web

from caliper_sidecar.outbox.sqlite.schema import migrate


async def bare(request: web.Request) -> web.Response:
    document = json.loads(await request.read())
    count = len(document) if isinstance(document, list) else 1
    return web.json_response({"accepted": count}, status=202)


def naive_app(db_path: str, synchronous: str) -> web.Application:
    app = web.Application()
    db_key = web.AppKey("db", aiosqlite.Connection)
    # One transaction at a time on the one connection: the naive design's whole point.
    lock = asyncio.Lock()

    async def connection(app: web.Application) -> AsyncIterator[None]:
        import sqlite3

        setup = sqlite3.connect(db_path, isolation_level=None)
        setup.execute("PRAGMA journal_mode = WAL")
        migrate(setup)
        setup.close()
        async with aiosqlite.connect(db_path, isolation_level=None) as db:
            await db.execute(f"PRAGMA synchronous = {synchronous}")
            app[db_key] = db
            yield

    async def ingest(request: web.Request) -> web.Response:
        document = json.loads(await request.read())
        events = document if isinstance(document, list) else [document]
        rows = [(e["id"], json.dumps(e).encode(), 0, 0.0) for e in events]
        db = request.app[db_key]
        async with lock:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(
                "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)", rows
            )
            await db.execute("COMMIT")
        return web.json_response({"accepted": len(rows)}, status=202)

    app.cleanup_ctx.append(connection)
    app.router.add_post("/v1/events", ingest)
    return app


def sink_app() -> web.Application:
    app = web.Application()
    received = [0]

    async def envelope(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            received[0] += len(json.loads(body)["data"])
        except (ValueError, KeyError, TypeError) as e:
            # Said on stderr (the bench keeps it in the forwarder's folder), answered 400.
            print(f"sink: unreadable body ({e}): {body[:300]!r}", file=sys.stderr, flush=True)
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"status": "success"})

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"events": received[0]})

    app.router.add_post("/{path:.*}", envelope)
    app.router.add_get("/count", count)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bare", "naive", "sink"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default="naive.db")
    parser.add_argument("--synchronous", default="full")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop's event loop")
    args = parser.parse_args()
    if args.kind == "bare":
        app = web.Application()
        app.router.add_post("/v1/events", bare)
    elif args.kind == "sink":
        app = sink_app()
    else:
        app = naive_app(args.db, args.synchronous)
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
