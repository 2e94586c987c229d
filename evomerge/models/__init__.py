"""Layer 1: model folders (config.json, tokenizer, weights loaded safely), source models read tensor by tensor, and the architectures whose layers can be re-ordered."""
