"""LLM serving: one async OpenAI-compatible client and the backends it talks to."""
