"""Calling models: endpoints and pre-run checks, the gateway (the only litellm caller), adaptive concurrency, the
circuit breaker, the call cache, the embedded llama.cpp server, prompts, output parsers and pairwise judging."""
