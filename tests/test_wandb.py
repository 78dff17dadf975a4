"""W&B as its users expect: a finished run logs the report's figures and its eval table (src/training/
wandb_report.py), sweeps stagger their wandb.init (src/training/loggers.py), and `make wandb-sync` uploads the
offline runs not synced yet (scripts/wandb_sync.py). Everything offline: the real SDK in offline mode, its
records read back from the transaction log it wrote (tests/wandb_fake.py `read_records`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import wandb
from wandb.cli import beta_sync

from analysis.figures import save_figure
from analysis.positions import position_figures
from analysis.sources import combine, load_local
from src.errors import ConfigError
from src.metrics import STEP, VAL_LOSS, WANDB_STEP, label
from src.structured import to_dataclass
from src.training import loggers, wandb_report
from src.training.config import LoggerConfig
from src.training.trainer import train
from tests.conftest import ROOT
from tests.train_helpers import compose_train, record_rows, tiny_overrides
from tests.wandb_fake import ServerRun, read_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIGURES = ["loss_by_position", "bias_by_distance", "attention_stats"]
WANDB_DIRS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline W&B with every directory it writes in a temporary one (conftest's default is disabled)."""
    root = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as env:
        for var in WANDB_DIRS:
            env.setenv(var, str(root / var.lower()))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("NETRC", str(root / "netrc"))  # no credentials from ~/.netrc either
        env.delenv("WANDB_API_KEY", raising=False)
        env.delenv("WANDB_BASE_URL", raising=False)
        yield root


@pytest.fixture(scope="module")
def offline_run(wandb_env, tmp_path_factory):
    """A real tiny training run with logger=wandb, logger.mode=offline (ALiBi: all three per-run figures)."""
    run_dir = tmp_path_factory.mktemp("runs") / "alibi-run"
    extra = ["logger=wandb", "logger.mode=offline", "model/pe=alibi", "sweep_name=unit", "run_name=alibi-run"]
    summary = train(compose_train(tiny_overrides(tmp_path_factory.mktemp("data_cache"), extra=extra)), run_dir)
    assert summary["status"] == "finished"
    [wandb_dir] = (run_dir / "wandb").glob(f"offline-run-*-{summary['wandb_run_id']}")
    return run_dir, wandb_dir


# ---------------------------------------------------------------------------------- (a) figures and eval table


@pytest.mark.slow
def test_a_finished_run_logs_the_reports_figures_and_its_eval_table(offline_run, tmp_path):
    run_dir, wandb_dir = offline_run
    media = wandb_dir / "files" / "media"
    [history_row] = [r for r in ServerRun.from_records(read_records(next(wandb_dir.glob("*.wandb")))).history
                     if wandb_report.TABLE_KEY in r]  # one row at the end, at the run's final step
    final_step = json.loads((run_dir / "summary.json").read_text())[STEP]
    assert history_row[WANDB_STEP] == final_step

    # each image is the figure `make report` draws for this run: the same pixels as its saved PNG
    report = combine([load_local([run_dir])])
    drawn = position_figures(report.runs, report.details)
    for stem in FIGURES:
        logged = history_row[wandb_report.FIGURE_KEY.format(stem=stem)]
        assert logged["_type"] == "image-file" and logged["format"] == "png"
        [png] = media.glob(f"images/report/{stem}_*.png")
        assert logged["path"] == png.relative_to(wandb_dir / "files").as_posix()
        [reference, _] = save_figure(drawn[stem].figure, tmp_path, stem)
        np.testing.assert_array_equal(matplotlib.image.imread(png), matplotlib.image.imread(reference))
        assert matplotlib.image.imread(png)[..., :3].std() > 0.05  # a drawn figure, not a blank canvas

    # the table: the final evaluation's row of metrics.jsonl, labelled as the report labels metrics
    assert history_row[wandb_report.TABLE_KEY]["_type"] == "table-file"
    [table_file] = media.glob("table/report/final_eval_*.table.json")
    table = json.loads(table_file.read_text())
    final = [r for r in record_rows(run_dir) if VAL_LOSS in r][-1]
    assert table["columns"] == ["metric", "label", "value"]
    assert [row[0] for row in table["data"]] == [k for k in final if k != STEP]
    rows = {row[0]: row for row in table["data"]}
    assert rows[VAL_LOSS] == [VAL_LOSS, label(VAL_LOSS), pytest.approx(final[VAL_LOSS])]
    assert rows["extrapolation/loss_x2"][1] == label("extrapolation/loss_x2", context=64) == (
        "loss at 2× context = 64 tokens (nats)")


class RecordingRun:  # the one call log_final_report makes on a wandb run
    def __init__(self):
        self.logged = []

    def log(self, row):
        self.logged.append(row)


@pytest.mark.slow  # its fixture trains
def test_a_figure_that_fails_to_draw_is_one_warning_and_the_table_is_still_logged(offline_run, monkeypatch,
                                                                                caplog):
    run_dir, _ = offline_run

    def broken(run_dir):
        raise ValueError("no such colour\nsecond line")

    monkeypatch.setattr(wandb_report, "figure_images", broken)
    run = RecordingRun()
    with caplog.at_level(logging.WARNING, logger=wandb_report.__name__):
        wandb_report.log_final_report(run, run_dir)
    assert [r.getMessage() for r in caplog.records] == [
        "W&B report: the figures were not logged (ValueError: no such colour)"]
    [row] = run.logged
    assert set(row) == {WANDB_STEP, wandb_report.TABLE_KEY}

    caplog.clear()
    monkeypatch.setattr(RecordingRun, "log", lambda self, row: 1 / 0)  # logging itself fails: never raised
    with caplog.at_level(logging.WARNING, logger=wandb_report.__name__):
        wandb_report.log_final_report(run, run_dir)
    assert len(caplog.records) == 2 and "ZeroDivisionError" in caplog.records[-1].getMessage()


def test_matplotlib_and_analysis_are_loaded_only_for_a_wandb_run():
    code = ("import sys; import src.training.trainer, src.training.loggers; "
            "print(sorted(m for m in ('matplotlib', 'analysis', 'wandb', 'src.training.wandb_report') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------- (b) staggered wandb.init


def test_the_init_delay_is_deterministic_in_range_and_spreads_array_tasks():
    delays = [loggers.init_delay(30, "rope-flash-s1", {"SLURM_ARRAY_TASK_ID": str(i)}) for i in range(18)]
    assert delays == [loggers.init_delay(30, "another-name", {"SLURM_ARRAY_TASK_ID": str(i)}) for i in range(18)]
    assert all(0 <= d < 30 for d in delays) and len(set(delays)) == 18
    gaps = np.diff(sorted(delays))
    assert gaps.min() > 0.5  # 18 tasks over 30 s: none within half a second of another
    by_name = [loggers.init_delay(30, f"rope-flash-s{seed}", {}) for seed in range(10)]
    assert by_name == [loggers.init_delay(30, f"rope-flash-s{seed}", {}) for seed in range(10)]
    assert all(0 <= d < 30 for d in by_name) and len(set(by_name)) == 10
    assert loggers.init_delay(0, "x", {"SLURM_ARRAY_TASK_ID": "5"}) == 0.0


@pytest.mark.parametrize("bad", [{"init_stagger_s": -1}, {"init_stagger_s": float("inf")}, {"init_retries": -1}])
def test_a_negative_stagger_or_retry_count_is_a_one_line_config_error(bad):
    with pytest.raises(ConfigError) as raised:
        to_dataclass(LoggerConfig, {"name": "wandb", **bad})
    [key] = bad
    assert f"logger.{key} must be" in str(raised.value) and "\n" not in str(raised.value)


def test_the_logger_configs_and_the_grid_sweeps_set_the_stagger():
    from sweeps.run_sweep import load_sweep

    assert to_dataclass(LoggerConfig, compose_train(["logger=wandb"]).logger).init_stagger_s == 0
    for sweep in ("grid", "grid_with_nope"):  # their jobs log to W&B (experiment gpt2_124m_fineweb)
        spec = load_sweep(sweep)
        cfg = compose_train([f"experiment={spec['experiment']}", *spec["overrides"]])
        assert cfg.logger.name == "wandb" and to_dataclass(LoggerConfig, cfg.logger).init_stagger_s == 30


@pytest.fixture
def fake_init(monkeypatch, tmp_path):
    """wandb.init that fails with the errors given first, then returns a disabled run; time.sleep recorded."""
    calls, sleeps, errors = [], [], []
    real_init = wandb.init

    def init(**kwargs):
        calls.append(kwargs)
        if errors:
            raise errors.pop(0)
        return real_init(**{**kwargs, "mode": "disabled"})

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(loggers.time, "sleep", sleeps.append)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    return calls, sleeps, errors


def test_an_online_run_waits_its_delay_then_retries_a_communication_error(fake_init, tmp_path):
    calls, sleeps, errors = fake_init
    errors.append(wandb.errors.CommError("429 Too Many Requests"))
    cfg = LoggerConfig(name="wandb", mode="online", init_stagger_s=30)
    logger = loggers.WandbLogger(cfg, tmp_path, "rope-flash-s1", {}, [])
    assert sleeps == [loggers.init_delay(30, "rope-flash-s1", {"SLURM_ARRAY_TASK_ID": "7"}), loggers.INIT_BACKOFF_S]
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] == logger.run_id
    logger.finish()


def test_bad_credentials_are_not_retried_and_retries_are_bounded(fake_init, tmp_path):
    calls, sleeps, errors = fake_init
    errors.append(wandb.errors.AuthenticationError("API key is invalid"))
    cfg = LoggerConfig(name="wandb", mode="online", init_retries=2)
    with pytest.raises(wandb.errors.AuthenticationError):
        loggers.WandbLogger(cfg, tmp_path, "run", {}, [])
    assert len(calls) == 1 and sleeps == []
    errors.extend([wandb.errors.CommError("timed out")] * 3)
    with pytest.raises(wandb.errors.CommError, match="timed out"):
        loggers.WandbLogger(cfg, tmp_path, "run", {}, [])
    assert len(calls) == 4 and sleeps == [loggers.INIT_BACKOFF_S, 2 * loggers.INIT_BACKOFF_S]


def test_an_offline_run_never_waits(fake_init, tmp_path):
    calls, sleeps, _ = fake_init
    loggers.WandbLogger(LoggerConfig(name="wandb", mode="offline", init_stagger_s=30), tmp_path, "run", {},
                        []).finish()
    assert len(calls) == 1 and sleeps == []


# ---------------------------------------------------------------------------------- (c) make wandb-sync


def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sync(*args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "scripts/wandb_sync.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def runs_with_offline_data(offline_run, tmp_path_factory):
    """outputs-like tree: the real offline run (not synced), a copy marked synced, an online run's folder and a
    superseded record's offline folder (hidden directory)."""
    run_dir, wandb_dir = offline_run
    root = tmp_path_factory.mktemp("outputs")
    todo = root / "unit" / "todo" / "wandb" / wandb_dir.name
    shutil.copytree(wandb_dir, todo)
    done = root / "unit" / "done" / "wandb" / wandb_dir.name
    shutil.copytree(wandb_dir, done)
    for log in done.glob("*.wandb"):
        log.with_suffix(".wandb.synced").touch()
    online = root / "unit" / "online" / "wandb" / wandb_dir.name.replace("offline-run", "run")
    shutil.copytree(wandb_dir, online)
    shutil.copytree(wandb_dir, root / "unit" / ".superseded" / "old" / "wandb" / wandb_dir.name)
    assert not beta_sync._is_synced(next(todo.glob("*.wandb")))  # the SDK's own rule for the marker
    assert beta_sync._is_synced(next(done.glob("*.wandb")))
    return root, todo


@pytest.mark.slow
def test_wandb_sync_dry_run_lists_exactly_the_unsynced_offline_run(runs_with_offline_data):
    root, todo = runs_with_offline_data
    result = sync("--runs", str(root), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"wandb-sync: 2 offline W&B run folder(s) under {root}, 1 already synced, 1 to sync:", f"  {todo}"]


@pytest.mark.slow
def test_wandb_sync_without_key_or_network_fails_in_one_line_and_keeps_the_data(runs_with_offline_data):
    root, _ = runs_with_offline_data
    before = tree(root)
    no_key = sync("--runs", str(root))
    assert no_key.returncode == 2
    [line] = no_key.stderr.splitlines()
    assert "no W&B API key configured" in line and "`wandb login`" in line and "Nothing was synced" in line
    # a key but no server: a port that refuses at once (the same on a machine with network)
    no_network = sync("--runs", str(root), env_extra={"WANDB_API_KEY": "0" * 40,
                                                      "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert no_network.returncode == 2
    [line] = no_network.stderr.splitlines()
    assert line.startswith("wandb-sync: cannot reach http://127.0.0.1:9 (") and "network" in line
    assert tree(root) == before  # nothing written, moved or deleted
    assert sync("--runs", str(root / "missing")).returncode == 2
