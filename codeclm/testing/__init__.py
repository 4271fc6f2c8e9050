"""Test support, beside the product: the loopback OpenAI-compatible server (chat and fine-tuning APIs) that tests
and benchmarks run against. Nothing in the product imports it."""
