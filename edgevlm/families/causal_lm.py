"""Text-only causal LMs (Qwen3, Qwen2, Llama/SmolLM2, ...): the reasoner and planner."""

from edgevlm.families import Family

FAMILY = Family(name="causal_lm", vision=False)
MODEL_TYPES = ()  # any config whose architectures end in ForCausalLM (families.reasoner_family)
GRAPHS = ("decoder",)
VISION_MODULES = ()
PREPROCESS_SCHEMA = None
ARRAYS = ()
