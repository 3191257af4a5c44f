"""Inspection settings, read from the environment when asked (never at import time).

| variable            | default | meaning                                                        |
|---------------------|---------|----------------------------------------------------------------|
| `TILECOMP_DUMP_DIR` | unset   | directory where `compile_model` writes every stage and, at      |
|                     |         | debug >= 2, every pass's output as `{step}.{NN}.{pass}.ir`     |
| `TILECOMP_DEBUG`    | `0`     | 0 quiet; 1 progress lines (stage, seconds) on stderr;           |
|                     |         | 2 also dump each pass and check its text round trip            |

`tilecomp compile --out OUT` always writes the stages to OUT; the variables
add the per-pass dumps. Dumps are named `{step}.{stage}` (e.g.
`decode_step.graph.fused.ir`), and each parses back with `tilecomp ir check`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from tilecomp.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    dump_dir: str | None = None
    debug: int = 0


def settings(environ=None) -> Settings:
    """The settings from `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ
    raw = env.get("TILECOMP_DEBUG", "0").strip() or "0"
    if not raw.isdigit():
        raise ConfigError(f"TILECOMP_DEBUG: expected a non-negative integer, found {raw!r}")
    return Settings(dump_dir=env.get("TILECOMP_DUMP_DIR") or None, debug=int(raw))
