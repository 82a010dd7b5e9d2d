"""Pure policy: block identity, tier pools, the planner. Imports neither torch nor vLLM."""
