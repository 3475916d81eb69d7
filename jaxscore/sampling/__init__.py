"""The jitted multi-turn sampler, episode formats and rollouts over tasks."""
