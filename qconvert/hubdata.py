"""Text from Hugging Face datasets by short name, for calibration (and evaluation) when online.

The names are the usual calibration/evaluation sets; the table says where each lives and which column holds
text. Everything else in qconvert is offline: without the ``datasets`` package or without network access, the
error says how to get the text into a local file instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qconvert.errors import QConvertError


class HubDataError(QConvertError):
    """A hub dataset was asked for but cannot be loaded here."""


@dataclass(frozen=True)
class HubText:
    path: str
    name: str | None
    split: str
    column: str = "text"
    data_files: str | None = None


# short name -> (repo, config, split, column); "train" splits for calibration, "test" for evaluation
HUB_TEXTS = {
    "wikitext2": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "wikitext2-test": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "c4": HubText("allenai/c4", None, "train", data_files="en/c4-train.00000-of-01024.json.gz"),
    "pileval": HubText("mit-han-lab/pile-val-backup", None, "validation"),
}


def parse_hub_name(source: str) -> HubText | None:
    """``wikitext2`` / ``c4`` / ``pileval`` / ``hf:NAME[:split]`` -> where to load it; None for anything else."""
    if source in HUB_TEXTS:
        return HUB_TEXTS[source]
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        if not name:
            raise HubDataError(f"{source!r}: give a dataset after hf:, e.g. hf:Salesforce/wikitext or hf:NAME:test.")
        return HubText(name, None, split or "train")
    return None


def load_hub_texts(source: str, what: str = "calibration") -> list[str]:
    """The non-empty text rows of a hub dataset; a clear error when ``datasets`` or the network is missing."""
    spec = parse_hub_name(source)
    if spec is None:
        raise HubDataError(f"{source!r} is not a hub dataset name (use wikitext2, c4, pileval or hf:NAME[:split]).")
    local = "export the text you want to a local .txt/.jsonl file and pass its path"
    try:
        import datasets
    except ImportError:
        raise HubDataError(f"{what} set {source!r} is a Hugging Face dataset and needs the `datasets` package "
                           f"(pip install datasets) and network access; or {local}.") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise HubDataError(f"{what} set {source!r} needs network access but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                           f"is set; unset it, or {local}.")
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
    except Exception as e:  # network, missing repo, bad split: all mean "not available here"
        raise HubDataError(f"could not load {what} set {source!r} ({spec.path}, split {spec.split}): "
                           f"{type(e).__name__}: {e}. Check the network and the name, or {local}.") from e
    if spec.column not in ds.column_names:
        raise HubDataError(f"{spec.path} has no {spec.column!r} column (it has {ds.column_names}); export the text "
                           f"column you want to a local file instead.")
    return [t for t in ds[spec.column] if isinstance(t, str) and t.strip()]
