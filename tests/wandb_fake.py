"""A fake W&B *server* for the analysis's W&B loader, made from what the real SDK logged, behind the real SDK.

How a test gets its `wandb.Api`:

1. `replay_run_record(run_dir, out_dir)` logs a local run record through the trainer's own `WandbLogger` with the
   real SDK in offline mode (rows, summary, the final report, finish with the run's exit code); wandb-core
   writes the run's transaction log `<out_dir>/wandb/offline-run-*/run-<id>.wandb`.
2. `read_records` reads that log back: W&B's leveldb-style framing (`:W&B` header, 32 KiB blocks of
   CRC-checked chunks; the SDK has no Python reader any more, wandb-core reads it in Go), each record parsed
   with the SDK's own protobuf class `wandb.proto.wandb_internal_pb2.Record`.
3. `ServerRun.from_records` is the server's side of the upload, as far as the reader needs it: the run's
   config and summary after every update, its history rows, its state from the exit record.
4. `fake_api(runs, entity, project)` builds a real `wandb.Api` whose transport (`ServiceApi`, the Python ->
   wandb-core boundary: every GraphQL query and history scan goes through its `send_api_request`) is
   `FakeServiceApi`, which answers the SDK's requests with protobuf responses in the SDK's own message types
   and GraphQL `data` JSON in the server's schema. Everything above it is the SDK's code: `Api.__init__` (its
   login check included), `Api.runs`, the `Runs` paginator, `Run` parsing its attrs (config, summaryMetrics,
   tags, state, group), lazy loading of the full run, `HTTPSummary`, `Run.scan_history` and `HistoryScan`'s
   paging.

What is a guess (no W&B server can be run here): how the server turns the logged records into what it serves
(config as {key: {"value": v}}, the summary as the last value per key after every update, one history row per
history record, nested keys as nested JSON objects, state `finished` for exit code 0 and `failed` otherwise),
and how wandb-core encodes a history row for `HistoryScan` (one `ParquetHistoryItem` per top-level key, its
value as JSON).
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from omegaconf import OmegaConf
from wandb.apis.public.service_api import ServiceApi
from wandb.proto import wandb_api_pb2 as apb

HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version 0
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
FAKE_API_KEY = "0" * 40


def read_records(path: Path) -> list:
    """Every record of a .wandb transaction log, parsed with the SDK's `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    records, pending, offset = [], b"", HEADER.size
    while offset + CHUNK.size <= len(data):
        if BLOCK - offset % BLOCK < CHUNK.size:  # a block's tail too short for a chunk header is padding
            offset += BLOCK - offset % BLOCK
            continue
        crc, length, kind = CHUNK.unpack_from(data, offset)
        chunk = data[offset + CHUNK.size:offset + CHUNK.size + length]
        offset += CHUNK.size + length
        if kind == 0 and length == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {offset}"
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _path(item) -> tuple[str, ...]:
    """An item's key: `key`, or the `nested_key` path wandb-core writes for flattened dicts."""
    return tuple(item.nested_key) if item.nested_key else (item.key,)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _remove(tree: dict, path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree.get(key, {})
    tree.pop(path[-1], None)


@dataclass
class ServerRun:
    """One run as the server holds it after the upload of its records."""

    run_id: str
    display_name: str
    group: str
    tags: list[str]
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    state: str
    storage_id: str = field(default="")

    @classmethod
    def from_records(cls, records: Iterable, still_running: bool = False) -> ServerRun:
        config, summary, history, exit_code, run = {}, {}, [], None, None
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                for item in run.config.update:
                    _set(config, _path(item), json.loads(item.value_json))
            elif kind == "config":
                for item in record.config.update:
                    _set(config, _path(item), json.loads(item.value_json))
                for item in record.config.remove:
                    _remove(config, _path(item))
            elif kind == "summary":
                for item in record.summary.update:
                    _set(summary, _path(item), json.loads(item.value_json))
                for item in record.summary.remove:
                    _remove(summary, _path(item))
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _set(row, _path(item), json.loads(item.value_json))
                history.append(row)
            elif kind == "exit":
                exit_code = record.exit.exit_code
        assert run is not None, "no run record"
        state = "running" if still_running or exit_code is None else "finished" if exit_code == 0 else "failed"
        return cls(run.run_id, run.display_name, run.run_group, list(run.tags), config, summary, history, state,
                   storage_id=f"storage-{run.run_id}")

    def node(self, full: bool) -> dict:
        """The run as GraphQL's `Run` type: LightweightRunFragment's fields, or RunFragment's with `full`."""
        node = {
            "projectId": "1", "id": self.storage_id, "name": self.run_id, "displayName": self.display_name,
            "tags": self.tags, "sweepName": None, "state": self.state, "group": self.group, "jobType": None,
            "commit": None, "readOnly": False, "createdAt": "2026-01-01T00:00:00", "heartbeatAt": "2026-01-01T00:00:00",
            "description": None, "notes": None, "historyLineCount": len(self.history),
            "user": {"name": "tester", "username": "tester"},
        }
        if full:  # JSONString scalars: JSON text inside the JSON response
            node |= {"config": json.dumps({k: {"value": v, "desc": None} for k, v in self.config.items()}),
                     "summaryMetrics": json.dumps(self.summary), "systemMetrics": json.dumps({}),
                     "historyKeys": self.history_keys()}
        return node

    def history_keys(self) -> dict:
        keys = sorted({k for row in self.history for k in row})
        return {"keys": {k: {"typeCounts": [{"type": "number", "count": 1}]} for k in keys},
                "lastStep": max((row.get("_step", -1) for row in self.history), default=-1)}


def replay_run_record(run_dir: Path, out_dir: Path, project: str = "pegrid") -> Path:
    """Log the run record in run_dir to W&B offline as the trainer would, through its own WandbLogger (and the
    final report of a finished run); returns the .wandb transaction log written under out_dir."""
    from src.metrics import STEP, TRAIN_LOSS
    from src.run_record import RunRecord
    from src.training.config import LoggerConfig
    from src.training.loggers import WandbLogger
    from src.training.trainer import run_name_and_tags

    record = RunRecord(run_dir)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    name, tags = run_name_and_tags(OmegaConf.create(config))
    summary = record.read_summary()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(LoggerConfig(name="wandb", project=project, group=config.get("sweep_name"), mode="offline"),
                         out_dir, name, config, tags)
    for row in record.read_metrics():  # an evaluation row is logged without its `step` (Trainer.evaluate)
        logger.log(row if TRAIN_LOSS in row else {k: v for k, v in row.items() if k != STEP}, row[STEP])
    logger.summary(summary)
    finished = summary.get("status") == "finished"
    if finished:
        logger.final_report(run_dir)
    logger.finish(0 if finished or summary.get("status") == "running" else 1)
    [log] = (out_dir / "wandb").glob(f"offline-run-*-{logger.run_id}/run-{logger.run_id}.wandb")
    return log


class FakeServiceApi(ServiceApi):
    """The transport under `wandb.Api`: the SDK's ServiceApi (its execute_graphql / authenticate run as they
    are) with `send_api_request`, its one call into wandb-core, answering for one project's runs."""

    _OPERATION = re.compile(r"\b(?:query|mutation)\s+(\w+)")

    def __init__(self, runs: list[ServerRun], entity: str, project: str, settings, timeout: float | None = None):
        super().__init__(settings=settings, timeout=timeout)
        self.runs, self.entity, self.project = runs, entity, project
        self.requests: list[tuple[str, dict]] = []  # (GraphQL operation or request kind, its variables), in order
        self._scans: dict[int, ServerRun] = {}
        self._scan_ids = itertools.count(1)

    # ------------------------------------------------------------------------------ ServiceApi's transport
    def send_api_request(self, request, timeout: float | None = None):
        kind = request.WhichOneof("request")
        if kind == "auth_request":
            self.requests.append(("authenticate", {}))
            return apb.ApiResponse(auth_response=apb.AuthResponse(
                authenticate_response=apb.AuthenticateResponse(default_entity=self.entity, username="tester")))
        if kind == "graphql_request":
            query, variables = request.graphql_request.query, json.loads(request.graphql_request.variables_json)
            operation = self._OPERATION.search(query).group(1)
            self.requests.append((operation, variables))
            data = self.graphql(operation, query, variables)
            return apb.ApiResponse(graphql_response=apb.GraphQLResponse(data_json=json.dumps(data)))
        if kind == "read_run_history_request":
            return apb.ApiResponse(read_run_history_response=self.history(request.read_run_history_request))
        raise NotImplementedError(f"fake W&B transport: no answer for a {kind}")

    def finalize(self, obj, cleanup):
        return lambda: None

    # ------------------------------------------------------------------------------ the server
    def _find(self, variables: dict) -> ServerRun | None:
        if (variables.get("entity"), variables.get("project")) != (self.entity, self.project):
            return None
        return next((r for r in self.runs if r.run_id == variables.get("name")), None)

    def graphql(self, operation: str, query: str, variables: dict) -> dict:
        if operation == "Runs":
            if (variables["entity"], variables["project"]) != (self.entity, self.project):
                return {"project": None}
            filters = json.loads(variables.get("filters") or "{}")
            if set(filters) - {"group"}:
                raise NotImplementedError(f"fake W&B server: filters {filters}")
            matching = [r for r in self.runs if "group" not in filters or r.group == filters["group"]]
            start = int(variables.get("cursor") or 0)
            page = matching[start:start + int(variables.get("perPage") or 50)]
            full = "...RunFragment" in query
            edges = [{"node": r.node(full), "cursor": str(start + i + 1)} for i, r in enumerate(page)]
            return {"project": {"internalId": "1", "runCount": len(matching), "readOnly": False, "runs": {
                "edges": edges,
                "pageInfo": {"endCursor": edges[-1]["cursor"] if edges else None,
                             "hasNextPage": start + len(page) < len(matching)}}}}
        if operation == "GetDefaultEntity":  # Api.runs asks even when the path names the entity
            return {"viewer": {"id": "VXNlcjox", "entity": self.entity}}
        if operation in ("Run", "RunHistoryKeys"):
            run = self._find(variables)
            if run is None:
                return {"project": None}
            answer = run.node(full=True) if operation == "Run" else {"historyKeys": run.history_keys()}
            return {"project": {"run": answer}}
        raise NotImplementedError(f"fake W&B server: no answer for GraphQL operation {operation}")

    def history(self, request):
        kind = request.WhichOneof("request")
        self.requests.append((kind, {}))
        if kind == "scan_run_history_init":
            init = request.scan_run_history_init
            run = self._find({"entity": init.entity, "project": init.project, "name": init.run_id})
            if run is None:
                raise NotImplementedError(f"fake W&B server: no run {init.entity}/{init.project}/{init.run_id}")
            scan_id = next(self._scan_ids)
            self._scans[scan_id] = run
            return apb.ReadRunHistoryResponse(
                scan_run_history_init=apb.ScanRunHistoryInitResponse(request_id=scan_id))
        if kind == "scan_run_history":
            scan = request.scan_run_history
            rows = [row for row in self._scans[scan.request_id].history
                    if scan.min_step <= row["_step"] < scan.max_step]
            return apb.ReadRunHistoryResponse(run_history=apb.RunHistoryResponse(history_rows=[
                apb.HistoryRow(history_items=[apb.ParquetHistoryItem(key=k, value_json=json.dumps(v))
                                              for k, v in row.items()]) for row in rows]))
        if kind == "scan_run_history_cleanup":
            self._scans.pop(request.scan_run_history_cleanup.request_id, None)
            return apb.ReadRunHistoryResponse()
        raise NotImplementedError(f"fake W&B server: no answer for a {kind}")


def fake_api(runs: list[ServerRun], entity: str, project: str):
    """A real `wandb.Api` (its __init__, login check included, runs unchanged) whose transport is a
    FakeServiceApi over `runs`; the transport is `api._service_api`."""
    import wandb
    from wandb.apis.public import api as api_module

    def service_api(settings, timeout=None):
        return FakeServiceApi(runs, entity, project, settings=settings, timeout=timeout)

    with mock.patch.object(api_module, "ServiceApi", service_api):
        return wandb.Api(api_key=FAKE_API_KEY, timeout=30)
