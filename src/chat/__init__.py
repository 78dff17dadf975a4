"""Using a trained model: KV-cached generation, the model store, the terminal chat and the Hub export.

- `generate.py`: sampling, the PE-aware context window, streamed decoding;
- `store.py`: load a run dir / checkpoint / export / Hub id / HF GPT-2, and a bounded cache of loaded models;
- `terminal.py`: `python -m src.chat` (the terminal chat);
The Hub export is `src/export/` (`python -m src.export`).
The Streamlit page (`app.py`) is built from the same pieces.
"""
