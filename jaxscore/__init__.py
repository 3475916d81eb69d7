"""jaxscore: RL for reasoning and self-correction (SCoRe) in pure-functional JAX."""

__version__ = "0.1.0"
