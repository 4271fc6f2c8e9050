"""One module per CodecLM step; each is a Prefect task over a batch that makes its LLM calls concurrently."""
