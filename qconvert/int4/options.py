"""The user-facing names of the GPTQ and AWQ settings and the config fields they set.

A name is both the ``qconvert gptq``/``awq`` option's dest and the recipe key, so one table per method serves
the CLI and recipes: a new setting is added here once. Names that are absent (or None) keep the config's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qconvert.int4.awq import AWQConfig
from qconvert.int4.gptq import GPTQConfig

GPTQ_OPTIONS: dict[str, str] = {
    "bits": "bits",
    "group_size": "group_size",
    "sym": "sym",
    "act_order": "desc_act",
    "static_groups": "static_groups",
    "damp": "damp_percent",
    "group_aware": "group_aware",
}

AWQ_OPTIONS: dict[str, str] = {
    "group_size": "group_size",
    "n_grid": "n_grid",
    "clip_grid": "clip_grid",
    "search_samples": "search_samples",
    "clip_all": "clip_all",
}


def int4_config(method: str, options: Mapping[str, Any]) -> GPTQConfig | AWQConfig:
    """``GPTQConfig`` (method "gptq") or ``AWQConfig`` ("awq") from user-facing ``options``; it validates them."""
    methods: dict[str, tuple[type[GPTQConfig | AWQConfig], dict[str, str]]] = {
        "gptq": (GPTQConfig, GPTQ_OPTIONS), "awq": (AWQConfig, AWQ_OPTIONS)}
    cls, table = methods[method]
    return cls(**{field: options[name] for name, field in table.items() if options.get(name) is not None})
