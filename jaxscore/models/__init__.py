"""The Llama-family model as pure functions, its weights, tokenizers and the embedded default."""
