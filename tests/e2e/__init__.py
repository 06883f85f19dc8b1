"""End-to-end tests: the real Dagster daemon, webserver and a browser."""
