"""Training-throughput benchmark of every PE x attention against a Hugging Face GPT-2 peer (CLI: src/benchmark/grid.py).

- `peer.py`: the peer, `GPT2LMHeadModel` with SDPA attention, behind our model's (idx, targets) interface;
- `step.py`: one timed training step (forward, backward, AdamW) of either model;
- `memory.py`: the extra memory one training step needs, on CUDA and on CPU;
- `report.py`: the JSON, Markdown and PNG outputs;
- `targets.py`: the performance targets, checked against those outputs (`python -m src.benchmark.targets`).
"""
