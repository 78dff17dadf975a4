"""The evaluation suite's config schema (Hydra group `eval`).

Stored in Hydra's ConfigStore as `eval_schema` (src/structured.py); conf/eval/default.yaml starts from it and the
other presets from default.yaml, so a misspelt key (`eval.val.num_tokns=1000`) fails at compose time, naming the
key. Its defaults are the full suite, eval=default: the presets list only what differs.
Importing this module (any `import src.eval`) is what registers it: do that before composing.
The metric names it reports are those of src/metrics.py.
"""

from dataclasses import dataclass, field

from src.errors import ConfigError
from src.structured import store_schema

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"

def _require_positive(section: str, cfg, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"eval.{section}.{key} must be positive, got {value}")


@dataclass
class ValConfig:
    # fixed budget: the loss is the mean over the first num_tokens tokens of the val split, so two runs
    # on the same data are scored on exactly the same windows whatever their batch size or world size.
    # 2^20 tokens of the val split (all of it if it holds fewer)
    num_tokens: int = 1_048_576
    batch_size: int = 8  # windows of block_size tokens per forward pass (per rank)

    def __post_init__(self) -> None:
        _require_positive("val", self, "num_tokens", "batch_size")


@dataclass
class HellaSwagConfig:
    enabled: bool = True
    # a local copy of hellaswag_val.jsonl; if null the file (10,042 items) is downloaded from `url` into cache_dir once
    path: str | None = None
    # relative paths are relative to the cwd; left at the default, $PEGRID_DATA_DIR/hellaswag replaces
    # it when that variable is set (one shared copy on a cluster)
    cache_dir: str = "data_cache/hellaswag"
    url: str = HELLASWAG_URL
    # sha256 a download from `url` must have, else it is deleted (rowanz/hellaswag's file, 12,246,618 bytes, as
    # pinned by HF datasets' hellaswag checksums); another url needs its own: `sha256sum hellaswag_val.jsonl`
    sha256: str = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
    limit: int | None = None  # score only the first `limit` of the 10,042 items (quick runs); null: all
    batch_size: int = 4  # items (4 endings, a sequence each) per forward pass (per rank)

    def __post_init__(self) -> None:
        _require_positive("hellaswag", self, "limit", "batch_size")


@dataclass
class ExtrapolationConfig:
    enabled: bool = True
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # context = m x model.block_size
    num_tokens: int = 262_144  # fixed token budget per context length, as val.num_tokens
    batch_size: int = 8  # windows per forward pass at 1x; at m x it is max(1, batch_size // m)
    # sliding-window evaluation as well (extrapolation/sliding_loss_x{m}): windows moved on by `stride` tokens,
    # only their last `stride` positions scored, so each with >= m x block_size - stride tokens of context;
    # about m x block_size / stride times the cost of the non-overlapping pass. null: off
    stride: int | None = None

    def __post_init__(self) -> None:
        _require_positive("extrapolation", self, "num_tokens", "batch_size", "stride")
        if not all(m >= 1 for m in self.multipliers):
            raise ConfigError(f"eval.extrapolation.multipliers must be whole numbers >= 1 (context = m x "
                              f"model.block_size), got {self.multipliers}")


@dataclass
class DetailsConfig:
    # eval_details.json at the final evaluation (the trainer's, python -m src.eval): the extrapolation windows'
    # loss by position, the PE's bias by distance, attention entropy and distance per layer (src/eval/details.py)
    enabled: bool = True
    attention_multipliers: list[int] = field(default_factory=lambda: [1, 4])  # contexts m x block_size probed
    attention_windows: int = 2  # validation windows per context for the attention statistics
    bias_multiplier: int = 4  # the bias is read at distances 0 ... bias_multiplier x block_size - 1

    def __post_init__(self) -> None:
        _require_positive("details", self, "attention_windows", "bias_multiplier")
        if not all(m >= 1 for m in self.attention_multipliers):
            raise ConfigError(f"eval.details.attention_multipliers must be whole numbers >= 1, got "
                              f"{self.attention_multipliers}")


@dataclass
class EvalConfig:
    val: ValConfig = field(default_factory=ValConfig)
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)
    extrapolation: ExtrapolationConfig = field(default_factory=ExtrapolationConfig)
    details: DetailsConfig = field(default_factory=DetailsConfig)


store_schema("eval", EvalConfig)
