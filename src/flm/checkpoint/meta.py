"""What a checkpoint's meta.json must hold, checked before anything is loaded from it.

Resuming from metadata with a missing or mistyped key used to either crash with a traceback or, worse,
continue with a default (a missing data position re-reads samples already trained on; a missing ramp runs
a half-grown model without its masks). Every key that inference or resume reads is therefore required and
type-checked here; a problem is one line naming the file and the key.

- inference (`flm generate`, `flm eval`, export, growth): format, step, model, ramp;
- resume (`flm train --resume`): also config, stage and data; data may be null only at step 0 (a
  checkpoint imported from a Hugging Face folder, where reading from the start is what a fresh run does);
- a sharded checkpoint also records the layout that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flm.config.growth import RAMPING
from flm.errors import FlmError

FORMAT_VERSION = 1
INFERENCE_KEYS = ("model", "ramp")  # besides format and step, which publishing adds
RESUME_KEYS = (*INFERENCE_KEYS, "config", "stage", "data")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, meta_file: Path, meta: dict[str, Any]):
        self.file, self.meta = meta_file, meta

    def fail(self, key: str, what: str) -> FlmError:
        return FlmError(f"{self.file}: {key} {what}")

    def get(self, key: str) -> Any:
        if key not in self.meta:
            raise self.fail(f"key '{key}'", "is missing")
        return self.meta[key]

    def count(self, key: str, value: Any, low: int = 0) -> int:
        if not _is_int(value) or value < low:
            raise self.fail(f"'{key}'", f"must be an integer >= {low}, got {value!r}")
        return value

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"'{key}'", f"must be an object, got {value!r}")
        return value

    def model(self, key: str, value: Any) -> None:
        from flm.config import model_config_from_dict

        try:  # a ramp's old shape is written with its unset (null) fields
            model_config_from_dict({k: v for k, v in self.table(key, value).items() if v is not None}, prefix=key)
        except FlmError as e:
            raise self.fail(f"'{key}'", f"is not a valid model config ({e})") from None


def validate_meta(meta_file: Path, meta: Any, resume: bool = False, sharded: bool = False) -> dict[str, Any]:
    """`meta` (parsed from `meta_file`) if it holds every key inference (or `resume`) reads, well typed."""
    if not isinstance(meta, dict):
        raise FlmError(f"{meta_file}: must hold a JSON object, got {type(meta).__name__}")
    c = _Checker(meta_file, meta)
    if c.get("format") != FORMAT_VERSION:
        raise FlmError(f"{meta_file}: a checkpoint of format {meta['format']!r}; this flm reads format {FORMAT_VERSION}")
    step = c.count("step", c.get("step"))
    c.model("model", c.get("model"))
    ramp = c.get("ramp")
    if ramp is not None:
        _check_ramp(c, c.table("ramp", ramp))
    if sharded:
        layout = c.table("layout", c.get("layout"))
        c.count("layout.world_size", layout.get("world_size"), low=1)
    if not resume:
        return meta
    from flm.config import config_from_dict

    try:
        config_from_dict(c.table("config", c.get("config")))
    except FlmError as e:
        raise c.fail("'config'", f"is not a valid run config ({e})") from None
    c.count("stage", c.get("stage"))
    data = c.get("data")
    if data is None:
        if step > 0:
            raise c.fail("'data'", f"is null at step {step}: the data position is unknown, so resuming would read "
                                   "samples again that were already trained on")
    else:
        c.count("data.samples_seen", c.table("data", data).get("samples_seen"))
    return meta


def _check_ramp(c: _Checker, ramp: dict[str, Any]) -> None:
    c.model("ramp.old", ramp.get("old"))
    sources = ramp.get("sources")
    if not isinstance(sources, list) or not all(
            isinstance(s, list) and len(s) == 2 and (s[0] is None or _is_int(s[0])) and s[1] in (True, False)
            for s in sources):
        raise c.fail("'ramp.sources'", f"must be a list of [old layer, is new] pairs, got {sources!r}")
    total = c.count("ramp.ramp_steps", ramp.get("ramp_steps"), low=1)
    done = c.count("ramp.steps_done", ramp.get("steps_done"))
    if ramp.get("operator", "msg") not in RAMPING:
        raise c.fail("'ramp.operator'", f"must be one of {RAMPING} (the families that ramp), got {ramp['operator']!r}")
    if done >= total:
        raise c.fail("'ramp.steps_done'", f"({done}) must be below ramp.ramp_steps ({total}): a finished ramp is null")
