"""Layer 5: scoring a model: the Evaluator interface and its lm-eval backend, the tasks of a fitness, the fitness (weighted metrics on seeded subsets), per-item scores, and one trial (recipe -> merged model -> score)."""

# the evaluator backends' registry (evaluation/backends.py builds them): the config's literal and
# `evomerge eval --backend`'s choices; here, so that the CLI reads it without importing torch
BACKENDS = ("hf", "vllm")
