"""Moving blocks between tiers: layout description and copy engines."""
