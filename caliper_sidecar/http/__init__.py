"""The HTTP side: the routes apps, SDKs, operators and Prometheus call, and what guards them."""
