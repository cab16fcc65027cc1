"""Text-only causal LMs (Qwen3, Qwen2, Llama/SmolLM2, ...): the reasoner and planner."""

from edgevlm.families import Family

FAMILY = Family(name="causal_lm", vision=False)
