"""krpo: fine-tune small instruction-tuned LLMs for reasoning with KRPO (Kalman-filter GRPO) and LoRA."""

__version__ = "0.1.0"
