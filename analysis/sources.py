"""Load runs from local run records or from W&B into the same two tidy tables, so everything downstream
(tables, figures, report) is written once and cannot tell where a run came from.

- `runs`: one row per run. Identity columns (`RUN_COLUMNS`: run_id, name, label, pe, attention, seed, sweep,
  status, error, source, location, step, tokens, num_params), the set-up columns (`SETUP_COLUMNS`: model
  sizes, data, tokenizer, budgets from the config; device, git commit, torch version from the summary;
  missing where a record predates them), then one column per final metric (`val/loss`,
  `hellaswag/acc_norm`, `extrapolation/loss_x2`, `perf/tokens_per_s`, ...), NaN when missing.
- `history`: one row per (run_id, step), one float column per logged metric (the metric names of the run
  record, README "Run record"); a training row and an evaluation row logged at the same step are merged.

- `details`: run_id -> the run's parsed eval_details.json (loss by token position, the PE's bias by distance,
  attention statistics; src/eval/details.py), for the local runs that have one; W&B runs have none.

`run_id` is unique: a local run's is its run dir, a W&B run's `entity/project/id`. `name` may repeat (two
sweeps, two seeds with a hand-set run_name, a local copy of a W&B run), so `label` is the name made unique
with the run id and is what figures and tables show.

An inference-time variant record (`<run dir>/variants/<variant>/`, its summary's `pe_variant` set, e.g.
"yarn×4") is a run of its own whose `pe` is `rope+yarn×4` (src/metrics.py `variant_pe_name`) and whose name is
`<run name> [yarn×4]`: every table and figure shows it as a PE of its own. It has no training history.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.metrics import SUMMARY_METRICS
from src.metrics import PE_VARIANT, base_pe_name, variant_pe_name
from src.run_record import DETAILS_FILE, RunRecord
from src.structured import nested_get
from src.training.run_lock import dead_holder

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_COLUMNS = ["run_id", "name", "label", "pe", "attention", "seed", "sweep", "status", "error", "source",
               "location", "step", "tokens", "num_params"]
STATUSES = ["finished", "running", "interrupted", "failed", "unknown"]
# What the report's set-up section describes: config keys (config.yaml / the W&B run config, dotted) and
# summary keys. Numeric ones are floats in `runs`, the others text.
SETUP_CONFIG_NUMERIC = ["model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
                        "trainer.max_steps", "trainer.total_batch_tokens", "trainer.lr", "trainer.min_lr_ratio",
                        "trainer.warmup_steps", "trainer.weight_decay", "trainer.eval_every", "eval.val.num_tokens",
                        "eval.extrapolation.num_tokens", "eval.hellaswag.limit"]
SETUP_CONFIG_TEXT = ["data.name", "data.tokenizer", "data.path", "data.hf_path", "eval.hellaswag.enabled"]
SETUP_SUMMARY_NUMERIC = ["world_size"]
SETUP_SUMMARY_TEXT = ["device", "git_commit", "torch_version", "config_fingerprint", "eval/preset"]
SETUP_NUMERIC = SETUP_CONFIG_NUMERIC + SETUP_SUMMARY_NUMERIC
SETUP_TEXT = SETUP_CONFIG_TEXT + SETUP_SUMMARY_TEXT
SETUP_COLUMNS = SETUP_NUMERIC + SETUP_TEXT
# Summary keys that describe the run rather than measure it; everything else numeric is a final metric.
_NOT_METRICS = {"run_name", "max_steps", "wandb_run_id", PE_VARIANT, *RUN_COLUMNS, *SETUP_COLUMNS} - {"tokens"}
# W&B run states -> the run record's status vocabulary (a crashed or killed run failed).
_WANDB_STATES = {"finished": "finished", "running": "running", "pending": "running", "preempted": "running",
                 "crashed": "failed", "failed": "failed", "killed": "failed"}
WANDB_STEP_KEY = "trainer/step"  # the step metric the trainer's W&B logger defines


class WandbUnavailable(RuntimeError):
    """W&B could not be read (not logged in, offline, no such project); the message names the fix."""


@dataclass
class Tables:
    runs: pd.DataFrame
    history: pd.DataFrame
    details: dict[str, dict] = field(default_factory=dict)  # run_id -> parsed eval_details.json


def is_variant(pes: pd.Series) -> pd.Series:
    """Which of these PE names are inference-time variants (`rope+yarn×4`), not trained PEs."""
    return pes.map(lambda pe: isinstance(pe, str) and base_pe_name(pe) != pe).astype(bool)


def _first_present(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def history_frame(run_id: str, rows: Iterable[dict]) -> pd.DataFrame:
    """Metric rows (each with `step`) -> one float row per step, training and evaluation rows merged.

    Evaluation rows carry no `tokens`; they get step x tokens-per-step so validation curves share the
    x-axis of the training ones.
    """
    numeric = [{k: v for k, v in row.items() if v is None or _is_number(v)} for row in rows if "step" in row]
    if not numeric:
        return pd.DataFrame({"run_id": pd.Series(dtype="str"), "step": pd.Series(dtype="int64")})
    frame = pd.DataFrame(numeric).astype("float64")
    frame = frame.groupby("step", as_index=False, sort=True).first()  # first non-null value per column
    if "tokens" in frame and frame["tokens"].notna().any():
        known = frame.dropna(subset=["tokens"])
        tokens_per_step = (known["tokens"] / known["step"]).median()
        frame["tokens"] = frame["tokens"].fillna(frame["step"] * tokens_per_step)
    frame["step"] = frame["step"].astype("int64")
    frame.insert(0, "run_id", run_id)
    return frame


def final_from_history(history: pd.DataFrame) -> dict[str, float]:
    """A run's final metrics as the trainer's summary computes them: the last value of each metric, but the
    median throughput / MFU and the maximum peak memory. Used where summary.json lacks them (a run that is
    still running, or was killed before it wrote its summary)."""
    final = {}
    for column in history.columns.drop(["run_id", "step"], errors="ignore"):
        values = history[column].dropna()
        if values.empty:
            continue
        if column in ("perf/tokens_per_s", "perf/mfu"):
            final[column] = float(values.median())
        elif column == "perf/peak_mem_mb":
            final[column] = float(values.max())
        else:
            final[column] = float(values.iloc[-1])
    return final


def setup_values(config: dict, summary: dict) -> dict:
    """The set-up columns of one run, None where its record does not say."""
    values = {key: nested_get(config, key) for key in SETUP_CONFIG_NUMERIC + SETUP_CONFIG_TEXT}
    values |= {key: summary.get(key) for key in SETUP_SUMMARY_NUMERIC + SETUP_SUMMARY_TEXT}
    return values


def run_row(identity: dict, setup: dict, summary: dict, history: pd.DataFrame) -> dict:
    """One row of `runs`: identity, set-up, then the summary's numbers, then whatever only the history has."""
    from_summary = {k: float(v) for k, v in summary.items()
                    if k not in _NOT_METRICS and not k.startswith("_") and _is_number(v) and math.isfinite(v)}
    final = final_from_history(history) | from_summary
    return {**identity, **setup,
            "step": _first_present(summary.get("step"), history["step"].max() if len(history) else None),
            "tokens": final.pop("tokens", None),
            **{k: v for k, v in final.items() if k not in RUN_COLUMNS and k not in SETUP_COLUMNS}}


def _as_text(value: Any) -> str | None:
    """A set-up value as the config writes it (`true`, not `True`); missing stays missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """The `runs` table with fixed dtypes (the same whether built fresh or read back from Parquet)."""
    frame = pd.DataFrame(rows)
    for column in RUN_COLUMNS + SETUP_COLUMNS + SUMMARY_METRICS:  # always there, NaN when not logged (MFU on CPU)
        if column not in frame:
            frame[column] = None
    metric_columns = sorted(c for c in frame.columns if c not in RUN_COLUMNS and c not in SETUP_COLUMNS)
    frame = frame[RUN_COLUMNS + SETUP_COLUMNS + metric_columns]
    text = ["run_id", "name", "label", "pe", "attention", "sweep", "status", "error", "source", "location"]
    frame[text] = frame[text].astype("str")  # pandas' string dtype; missing stays missing
    frame[SETUP_TEXT] = frame[SETUP_TEXT].map(_as_text).astype("str")
    frame[SETUP_NUMERIC] = frame[SETUP_NUMERIC].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame["status"] = frame["status"].where(frame["status"].isin(STATUSES), "unknown")
    frame[["pe", "attention"]] = frame[["pe", "attention"]].fillna("unknown")  # a record without summary or config
    for column in ["seed", "step", "num_params"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in ["tokens", *metric_columns]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def concat_histories(histories: Iterable[pd.DataFrame]) -> pd.DataFrame:
    non_empty = [h for h in histories if len(h)]
    return pd.concat(non_empty, ignore_index=True) if non_empty else history_frame("", [])


def combine(tables: list[Tables], sweep: str | None = None) -> Tables:
    """Several sources as one pair of tables (only `sweep`'s runs, if given), with `label` made unique among
    the runs kept (a repeated name gets its run id)."""
    runs = runs_frame([row for t in tables for row in t.runs.to_dict("records")])
    if sweep is not None:
        runs = runs[runs["sweep"] == sweep].reset_index(drop=True)
    history = concat_histories(t.history for t in tables)
    history = history[history["run_id"].isin(runs["run_id"])].reset_index(drop=True)
    if runs["run_id"].duplicated().any():
        raise ValueError(f"the same run was loaded twice: {sorted(runs['run_id'][runs['run_id'].duplicated()])}")
    duplicated = runs["name"].duplicated(keep=False)
    runs["label"] = runs["name"].where(~duplicated, runs["name"] + " [" + runs["run_id"] + "]")
    kept = set(runs["run_id"])
    details = {run_id: d for t in tables for run_id, d in t.details.items() if run_id in kept}
    return Tables(runs.sort_values(["sweep", "pe", "attention", "seed", "run_id"], na_position="last",
                                   ignore_index=True), history, details)


# ------------------------------------------------------------------------------------------------ local


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under root (root included) holding a summary.json or a metrics.jsonl, except under
    hidden directories below root: `.superseded/` (records a sweep moved aside), `.sweep_logs/`, `.hydra/`."""
    found = set()
    for name in (SUMMARY_FILE, METRICS_FILE):
        for path in root.rglob(name):
            if not any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
                found.add(path.parent.resolve())
    return sorted(found)


def _read_config(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _display_path(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def read_details(run_dir: Path) -> dict | None:
    """The run's eval_details.json, None when it has none; an unreadable or malformed one is skipped with a
    warning (the report is drawn without it)."""
    path = run_dir / DETAILS_FILE
    if not path.exists():
        return None
    try:
        details = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"{_display_path(path)}: unreadable ({type(err).__name__}: {err}), skipped", stacklevel=2)
        return None
    if not isinstance(details, dict):
        warnings.warn(f"{_display_path(path)}: not a JSON object, skipped", stacklevel=2)
        return None
    return details


def _local_status(run_dir: Path, summary: dict) -> dict:
    """The record's status and error; a record that says "running" whose process is gone failed (as W&B calls a
    killed run), with an error saying so: kill -9 or the OOM killer leave no word in summary.json."""
    status, error = summary.get("status", "unknown"), summary.get("error")
    if status == "running" and (holder := dead_holder(run_dir)):
        status, error = "failed", (f"its process ({holder}) ended without writing its end (killed: kill -9, out of "
                                   f"memory?) at step {summary.get('step')}; the same command resumes it from its "
                                   "newest checkpoint")
    return {"status": status, "error": error}


def load_local_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    record = RunRecord(run_dir)
    summary = record.read_summary()
    config = _read_config(run_dir / CONFIG_FILE)
    run_id = _display_path(run_dir)
    history = history_frame(run_id, record.read_metrics())
    variant = summary.get(PE_VARIANT) or None  # an inference-time variant record (variants/<variant>/)
    name = _first_present(summary.get("run_name"), config.get("run_name"), run_dir.name)
    pe = _first_present(summary.get("pe"), nested_get(config, "model.pe.name"))
    identity = {
        "run_id": run_id,
        "name": f"{name} [{variant}]" if variant else name,
        "pe": variant_pe_name(pe, str(variant)) if variant and pe else pe,
        "attention": _first_present(summary.get("attention"), nested_get(config, "model.attention.name")),
        "seed": _first_present(summary.get("seed"), nested_get(config, "trainer.seed")),
        "sweep": _first_present(summary.get("sweep"), config.get("sweep_name")),
        **_local_status(run_dir, summary),
        "source": "local",
        "location": run_id,
        "num_params": summary.get("num_params"),
    }
    return run_row(identity, setup_values(config, summary), summary, history), history


def load_local(roots: Iterable[str | Path]) -> Tables:
    """All run records found (recursively) under the given directories."""
    run_dirs = sorted({d for root in roots for d in find_run_dirs(Path(root))})
    loaded = [load_local_run(d) for d in run_dirs]
    details = {row["run_id"]: d for (row, _), run_dir in zip(loaded, run_dirs)
               if (d := read_details(run_dir)) is not None}
    return Tables(runs_frame([row for row, _ in loaded]), concat_histories(h for _, h in loaded), details)


# ------------------------------------------------------------------------------------------------ W&B


def _default_api():
    import wandb

    return wandb.Api(timeout=30)


def _tag_value(tags: Iterable[str], key: str) -> str | None:
    return next((t.split(":", 1)[1] for t in tags if t.startswith(f"{key}:")), None)


def _fetch_wandb(path: str, group: str | None, api_factory: Callable[[], Any]) -> list[dict]:
    """The raw runs of a W&B project (optionally one group), full histories included: every network call is
    here, so that any failure of W&B itself becomes one WandbUnavailable."""
    try:
        api = api_factory()
        fetched = []
        for run in api.runs(path, filters={"group": group} if group else {}):
            fetched.append({
                "id": run.id, "name": run.name, "group": run.group, "config": dict(run.config or {}),
                "tags": list(run.tags or []), "state": run.state, "summary": dict((run.summary or {}).items()),
                "history": list(run.scan_history()),
            })
    except Exception as err:  # auth, network, unknown project: the error types vary across wandb versions
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WandbUnavailable(
            f"cannot read W&B project {path!r} ({type(err).__name__}: {reason}); log in with `wandb login` "
            f"or read local run records instead with --runs DIR") from err
    return fetched


def _wandb_tables(path: str, fetched: list[dict]) -> Tables:
    rows, histories = [], []
    for run in fetched:
        run_id = f"{path}/{run['id']}"
        steps = [{**{k: v for k, v in r.items() if not k.startswith("_") and k != WANDB_STEP_KEY},
                  "step": _first_present(r.get(WANDB_STEP_KEY), r.get("_step"))} for r in run["history"]]
        history = history_frame(run_id, [r for r in steps if r["step"] is not None])
        config, tags = run["config"], run["tags"]
        # W&B's summary holds the last value of every logged key, the step metric too: not a final metric
        summary = {k: v for k, v in run["summary"].items() if k != WANDB_STEP_KEY}
        identity = {
            "run_id": run_id,
            "name": _first_present(run["name"], summary.get("run_name"), run["id"]),
            "pe": _first_present(nested_get(config, "model.pe.name"), _tag_value(tags, "pe"), summary.get("pe")),
            "attention": _first_present(nested_get(config, "model.attention.name"), _tag_value(tags, "attention"),
                                        summary.get("attention")),
            "seed": _first_present(nested_get(config, "trainer.seed"), summary.get("seed")),
            "sweep": _first_present(config.get("sweep_name"), run["group"], _tag_value(tags, "sweep")),
            "status": _WANDB_STATES.get(run["state"], summary.get("status", "unknown")),
            "error": summary.get("error"),
            "source": "wandb",
            "location": f"wandb:{run_id}",
            "num_params": summary.get("num_params"),
        }
        rows.append(run_row(identity, setup_values(config, summary), summary, history))
        histories.append(history)
    return Tables(runs_frame(rows), concat_histories(histories))


def wandb_cache_dir(cache_root: str | Path, path: str, group: str | None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{path}__{group or 'all-groups'}")
    return Path(cache_root) / slug


def load_wandb(path: str, group: str | None = None, cache_root: str | Path = ".cache/pegrid-wandb",
               refresh: bool = False, api_factory: Callable[[], Any] | None = None) -> Tables:
    """The runs of W&B project `entity/project` (one group = one sweep, if given), cached as Parquet.

    The first call downloads every run's full history (scan_history, not the sampled history()); later
    calls read the cache without touching the network, so re-plotting is offline and fast. refresh=True
    downloads again (runs that were still running have moved on). api_factory returns the API object
    (default: `wandb.Api`); tests pass a real `wandb.Api` over a fake transport (tests/wandb_fake.py).
    """
    cache = wandb_cache_dir(cache_root, path, group)
    runs_file, history_file = cache / "runs.parquet", cache / "history.parquet"
    if not refresh and runs_file.exists() and history_file.exists():
        return Tables(runs_frame(pd.read_parquet(runs_file).to_dict("records")), pd.read_parquet(history_file))
    tables = _wandb_tables(path, _fetch_wandb(path, group, api_factory or _default_api))
    cache.mkdir(parents=True, exist_ok=True)
    tables.runs.to_parquet(runs_file, index=False)
    tables.history.to_parquet(history_file, index=False)
    return tables
