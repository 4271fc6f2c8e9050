"""Training the target: the finetune step (plan, cache, publish), its local (TRL + PEFT) and remote trainers, and
serving tuned models on an OpenAI-compatible server."""
