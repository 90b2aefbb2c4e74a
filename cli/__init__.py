"""The `llmopt` command line: each command parses, calls the llmopt API, and renders with rich."""

from llmopt.cli.app import app, main

__all__ = ["app", "main"]
