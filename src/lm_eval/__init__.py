"""pegrid models in EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`).

- `adapter.py`: `PegridLM`, registered as lm-eval's model type `pegrid`;
- `__main__.py`: `python -m src.lm_eval --model pegrid --model_args pretrained=...`, lm-eval's own CLI with that
  model type registered (lm-eval has no plugin mechanism for models defined outside it).
From Python: `import src.lm_eval.adapter` (registers it), then `lm_eval.simple_evaluate(model="pegrid", ...)` or
`simple_evaluate(model=PegridLM(pretrained=...), ...)`.
"""
