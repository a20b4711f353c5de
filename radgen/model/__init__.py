"""The report generator's model: frozen vision encoder -> projector -> LoRA-tuned causal LLM."""
