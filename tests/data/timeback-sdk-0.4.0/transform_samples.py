"""Record the SDK's LearnWith.AI transform of the sidecar's own sample events (the demo's,
written from the TimeBack reference) in `lwai-transform-of-samples.json`.

Not part of the test suite (the SDK needs Python 3.12). Two steps, one per interpreter:

    .venv/bin/python tests/data/timeback-sdk-0.4.0/transform_samples.py inputs > /tmp/in.json
    /tmp/sdk/bin/python tests/data/timeback-sdk-0.4.0/transform_samples.py sdk < /tmp/in.json

The first writes the samples, the second runs `transform_for_lwai` on each and writes the pairs.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if sys.argv[1] == "inputs":
    sys.path.insert(0, str(HERE.parents[2]))
    from caliper_sidecar.tools.samples import sample_events

    json.dump(sample_events(), sys.stdout)
else:
    from timeback_caliper.resources.event_transformers.lwai import transform_for_lwai

    events = json.load(sys.stdin)
    pairs = [
        {
            "event": event,
            "sdk_lwai": transform_for_lwai(
                {"sensor": "s", "sendTime": "2024-01-15T10:00:00.000Z", "data": [event]}
            )["data"][0],
        }
        for event in events
    ]
    note = {
        "sdk": "timeback-caliper 0.4.0 (Python 3.12), "
        "resources.event_transformers.lwai.transform_for_lwai",
        "inputs": "caliper_sidecar.tools.samples.sample_events()",
        "recorded by": "tests/data/timeback-sdk-0.4.0/transform_samples.py",
    }
    out = HERE / "lwai-transform-of-samples.json"
    out.write_text(json.dumps({"note": note, "pairs": pairs}, indent=2) + "\n")
