"""Delivery: from a claimed batch to the platform and back (dispatcher, upstream client, the
platform's answers, backoff, tokens, processing confirmations, platform forms)."""
