"""Surfaces: how people reach the engine. The `alignsearch` command (cli), the HTTP server and its page (server,
web/), and the CLI's route to a running server (client). Nothing imports them.
"""
