"""`fuselm serve`: fused setups as OpenAI-compatible models over HTTP."""
