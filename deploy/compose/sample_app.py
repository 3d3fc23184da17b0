"""A stand-in learning app for the compose example: posts the TimeBack sample events for a new
student every few seconds to the sidecar, with the app's bearer token."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from sidecar.samples import sample_events

URL = os.environ.get("SIDECAR_URL", "http://sidecar:8787") + "/v1/events"
with open(os.environ["APP_TOKEN_FILE"]) as token_file:
    TOKEN = token_file.read().strip()

while True:
    request = urllib.request.Request(
        URL,
        data=json.dumps(sample_events()).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.status, response.read().decode(), flush=True)
    except (urllib.error.URLError, OSError) as e:
        print("sidecar not reachable:", e, flush=True)
    time.sleep(5)
