"""Chat with trained pegrid models in the browser: `streamlit run app.py`.

Pick a run or export found under the models roots ($PEGRID_MODELS_ROOT, default `outputs` and `exports`;
no other server folder can be loaded) or type a Hub id (ORG/REPO[/NAME], or hf:gpt2); answers stream token
by token and are shown verbatim. Models live in one process-wide `ModelStore` holding at most
$PEGRID_MAX_RESIDENT models (default 1): switching models frees the previous one. See docs/CHAT.md.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import streamlit as st

from src.chat.generate import Conversation, SamplingConfig, generate_text
from src.chat.store import (
    HF_PREFIX,
    PROJECT_DIRS,
    LoadedModel,
    ModelLoadError,
    ModelStore,
    discover_models,
    local_path,
    parse_pe_overrides,
)
from src.metrics import HELLASWAG_ACC_NORM, TRAIN_LOSS, VAL_LOSS, label


@st.cache_resource
def model_store() -> ModelStore:
    return ModelStore(max_resident=int(os.environ.get("PEGRID_MAX_RESIDENT", "1")))


def verbatim(text: str) -> str:
    """`text` as st.html shows it character for character. Markdown would turn indented lines into code blocks
    (showing any escaping backslashes) and st.text dedents and strips; escaped text in a pre-wrap div does not."""
    return f'<div style="white-space: pre-wrap">{html.escape(text)}</div>'


def models_roots() -> list[Path]:
    """$PEGRID_MODELS_ROOT: the folders (os.pathsep-separated, relative to the server's cwd) models load from."""
    value = os.environ.get("PEGRID_MODELS_ROOT", os.pathsep.join(PROJECT_DIRS))
    return [Path(root).expanduser() for root in value.split(os.pathsep) if root]


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether `path`, with symlinks and .. resolved, lies in one of `roots`."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def confined(spec: str, roots: list[Path]) -> str:
    """`spec` as the store should load it: a Hub id as it is, a local path resolved and only inside a root,
    since any visitor may type one."""
    path = local_path(spec)
    if path is None:
        return spec
    if not inside(path, roots):
        raise ModelLoadError(f"refused: {spec} is outside the models root ({', '.join(map(str, roots))}); "
                             "the server sets it with PEGRID_MODELS_ROOT")
    resolved = str(path.resolve())  # what was checked is what gets loaded
    return HF_PREFIX + resolved if spec.startswith(HF_PREFIX) else resolved


def sidebar(roots: list[Path]) -> tuple[str | None, SamplingConfig, int | None, list[str]]:
    with st.sidebar:
        st.header("Model")
        # a symlink out of a root is not listed (and would be refused)
        local = [spec for root in roots for spec in discover_models(root) if inside(Path(spec), roots)]
        choice = st.selectbox("Local run or export", local, index=0 if local else None,
                              placeholder="none found under the models root",
                              help=f"Runs and exports under {', '.join(map(str, roots))} (PEGRID_MODELS_ROOT)")
        hub = st.text_input("…or a Hub id", placeholder="ORG/REPO[/NAME] or hf:gpt2", key="hub").strip()
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
        pe_settings = st.text_input("PE settings for inference", placeholder="scaling.type=yarn scaling.factor=4",
                                    help="KEY=VALUE pairs that change the model's PE config, as `python -m src.chat "
                                         "--pe`: RoPE context extension without retraining (docs/CHAT.md)").split()
        if st.button("New conversation"):
            st.session_state.pop("chat", None)
    return hub or choice, sampling, window, pe_settings


def show_model(loaded: LoadedModel) -> None:
    info, metrics = loaded.info, loaded.metrics
    st.caption(f"PE **{info['pe']}** · attention **{info['attention']}** · {info['num_params']:,} parameters · "
               f"context: {loaded.context} · loaded in {loaded.load_seconds:.1f} s")
    shown = {k: metrics[k] for k in (VAL_LOSS, TRAIN_LOSS, HELLASWAG_ACC_NORM) if k in metrics}
    for column, (key, value) in zip(st.columns(max(len(shown), 1)), shown.items()):
        column.metric(label(key), f"{value:.3f}")


def main() -> None:
    st.set_page_config(page_title="pegrid chat")
    st.title("pegrid chat")
    roots = models_roots()
    spec, sampling, window, pe_settings = sidebar(roots)
    if not spec:
        st.info("No model: train one (`python -m src.train`), export one to `exports/`, or type a Hub id.")
        return
    try:
        loaded = model_store().get(confined(spec, roots), parse_pe_overrides(pe_settings))
    except ModelLoadError as err:
        st.error(str(err))
        return
    show_model(loaded)

    # One conversation per (model, window, PE settings); choosing another model starts a new one.
    chat = st.session_state.get("chat")
    key = (spec, window, tuple(pe_settings))
    if chat is None or chat["key"] != key:
        chat = st.session_state["chat"] = {
            "key": key,
            "conversation": Conversation.for_model(loaded.model, window, tokenizer=loaded.tokenizer),
            "messages": [],
        }
    for role, text in chat["messages"]:
        st.chat_message(role).html(verbatim(text))

    prompt = st.chat_input("Text for the model to continue")
    if prompt:
        chat["messages"].append(("user", prompt))
        st.chat_message("user").html(verbatim(prompt))
        text = ""
        with st.chat_message("assistant"):
            shown = st.empty()
            for piece in generate_text(loaded.model, chat["conversation"], prompt, sampling):
                text += piece
                shown.html(verbatim(text))
            if not text:
                st.caption("(the model ended the text at once)")
        chat["messages"].append(("assistant", text))


if __name__ == "__main__":  # `streamlit run` and AppTest run the script as __main__; tests import it
    main()
