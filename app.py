"""Chat with trained pegrid models in the browser: `streamlit run app.py`.

Pick a run found under the runs directory ($PEGRID_RUNS_DIR, default `outputs`) or type a Hub id
(ORG/REPO[/NAME], or hf:gpt2); answers stream token by token. Models live in one process-wide `ModelStore`
holding at most $PEGRID_MAX_RESIDENT models (default 1): switching models frees the previous one.
See docs/CHAT.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import streamlit as st

from src.generate import Conversation, SamplingConfig, generate_text
from src.model_store import LoadedModel, ModelLoadError, ModelStore, discover_models

_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # ASCII punctuation: CommonMark lets each be escaped


@st.cache_resource
def model_store() -> ModelStore:
    return ModelStore(max_resident=int(os.environ.get("PEGRID_MAX_RESIDENT", "1")))


def as_markdown(text: str) -> str:
    """Show model text as written: escape markdown syntax (and $ math), keep line breaks."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def stream_markdown(pieces: Iterable[str], raw: list[str]) -> Iterator[str]:
    """Pass generated text to st.write_stream escaped, collecting the raw text into `raw`."""
    for piece in pieces:
        raw.append(piece)
        yield as_markdown(piece)


def sidebar() -> tuple[str | None, SamplingConfig, int | None]:
    with st.sidebar:
        st.header("Model")
        runs_dir = st.text_input("Runs directory", os.environ.get("PEGRID_RUNS_DIR", "outputs"))
        local = discover_models(runs_dir)
        choice = st.selectbox("Local run or export", local, index=0 if local else None,
                              placeholder="none found under the runs directory")
        hub = st.text_input("…or a Hub id", placeholder="ORG/REPO[/NAME] or hf:gpt2").strip()
        st.header("Sampling")
        defaults = SamplingConfig()
        sampling = SamplingConfig(
            temperature=st.slider("Temperature (0 = greedy)", 0.0, 2.0, defaults.temperature, 0.05),
            top_k=int(st.number_input("Top-k (0 = off)", 0, 50257, defaults.top_k)),
            top_p=st.slider("Top-p", 0.05, 1.0, defaults.top_p, 0.05),
            max_new_tokens=int(st.number_input("Max new tokens", 1, 4096, defaults.max_new_tokens)),
            seed=st.number_input("Seed (empty = random)", min_value=0, value=None, step=1),
        )
        window = st.number_input("Window for PEs that extrapolate (empty = 2 x block size)", min_value=1,
                                 value=None, step=1)
        if st.button("New conversation"):
            st.session_state.pop("chat", None)
    return hub or choice, sampling, window


def show_model(loaded: LoadedModel) -> None:
    info, metrics = loaded.info, loaded.metrics
    context = (f"{info['max_context']} tokens" if info["max_context"] is not None
               else f"trained on {info['block_size']}, extrapolates")
    st.caption(f"PE **{info['pe']}** · attention **{info['attention']}** · {info['num_params']:,} parameters · "
               f"context {context} · loaded in {loaded.load_seconds:.1f} s")
    shown = {k: v for k, v in metrics.items() if k in ("val/loss", "train/loss", "hellaswag/acc_norm")}
    for column, (key, value) in zip(st.columns(max(len(shown), 1)), shown.items()):
        column.metric(key, f"{value:.3f}")


def main() -> None:
    st.set_page_config(page_title="pegrid chat")
    st.title("pegrid chat")
    spec, sampling, window = sidebar()
    if not spec:
        st.info("No model: train one (`python -m src.train`), set the runs directory, or type a Hub id.")
        return
    try:
        loaded = model_store().get(spec)
    except ModelLoadError as err:
        st.error(str(err))
        return
    show_model(loaded)

    # One conversation per (model, window); choosing another model starts a new one.
    chat = st.session_state.get("chat")
    if chat is None or chat["key"] != (spec, window):
        chat = st.session_state["chat"] = {
            "key": (spec, window),
            "conversation": Conversation.for_model(loaded.model, window),
            "messages": [],
        }
    for role, text in chat["messages"]:
        st.chat_message(role).markdown(as_markdown(text))

    prompt = st.chat_input("Text for the model to continue")
    if prompt:
        chat["messages"].append(("user", prompt))
        st.chat_message("user").markdown(as_markdown(prompt))
        raw: list[str] = []
        with st.chat_message("assistant"):
            st.write_stream(stream_markdown(generate_text(loaded.model, chat["conversation"], prompt, sampling), raw))
            if not raw:
                st.caption("(the model ended the text at once)")
        chat["messages"].append(("assistant", "".join(raw)))


if __name__ == "__main__":  # `streamlit run` and AppTest run the script as __main__; tests import it
    main()
