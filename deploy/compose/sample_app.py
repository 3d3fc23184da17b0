"""A stand-in learning app for the compose examples: posts the TimeBack sample events for a new
student every few seconds to the sidecar (on the loopback it shares with the sidecar, or over
the network with the bearer token in APP_TOKEN_FILE)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from caliper_sidecar.tools.samples import sample_events

URL = os.environ.get("SIDECAR_URL", "http://127.0.0.1:8787") + "/v1/events"
TOKEN = ""
if os.environ.get("APP_TOKEN_FILE"):
    with open(os.environ["APP_TOKEN_FILE"]) as token_file:
        TOKEN = token_file.read().strip()
HEADERS = {"Content-Type": "application/json"}
if TOKEN:
    HEADERS["Authorization"] = f"Bearer {TOKEN}"

while True:
    request = urllib.request.Request(
        URL,
        data=json.dumps(sample_events()).encode(),
        headers=HEADERS,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.status, response.read().decode(), flush=True)
    except (urllib.error.URLError, OSError) as e:
        print("sidecar not reachable:", e, flush=True)
    time.sleep(5)
