"""Serving: the OpenAI-compatible HTTP API with its chat page (`kiln serve`) and the terminal chat (`kiln chat`)."""
