"""The command line: serve, check-config, demo, report, audit, profile."""
