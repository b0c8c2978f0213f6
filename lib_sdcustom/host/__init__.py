"""Whoever hosts the tab and the runs: the `Host` interface with a host over plain folders (`base`), the
AUTOMATIC1111 WebUI adapter (`a1111`, the only module that touches `modules.*`), the HTTP API and its access
checks."""
