"""Data files in the formats practitioners keep them: rows in, rows with answers out.

JSONL and JSON arrays are read with the standard library (the fast path, no extra needed), CSV and TSV
with `csv` (cells stay the text written: no type guessing turns "NA" into a missing value or "007" into
7), Parquet with pyarrow in record batches (a file larger than memory streams through), folders written
by `datasets`' `save_to_disk` with `datasets` (memory-mapped Arrow), and `hf:ORG/NAME[:SPLIT]` with
`datasets` streaming from the hub. pyarrow and `datasets` come with the `data` extra.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import SwitchcitError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
WRITABLE = (".jsonl", ".csv", ".tsv", ".parquet")
EXTRA = "pip install 'switchcit[data]'"
HUB = "hf:"
BATCH_ROWS = 1024  # Arrow rows turned into Python objects at a time


class Where(NamedTuple):
    """The place of one row, for error messages: `file:line` for line-based files, `file row N` otherwise."""

    source: str
    number: int
    by_line: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.number}" if self.by_line else f"{self.source} row {self.number}"


Rows = Iterator[tuple[Where, Any]]


def read_rows(source: str | Path) -> Rows:
    """Every row of a data file, a folder of them, a `save_to_disk` folder or `hf:ORG/NAME[:SPLIT]`, in order."""
    text = str(source)
    if text.startswith(HUB):
        yield from _hub_rows(text[len(HUB):])
        return
    path = Path(source)
    if path.is_dir():
        if is_saved_dataset(path):
            yield from _saved_rows(path)
        else:
            for file in _data_files(path):
                yield from _file_rows(file)
    elif path.is_file():
        yield from _file_rows(path)
    else:
        raise SwitchcitError(f"data file not found: {path}")


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _data_files(folder: Path) -> list[Path]:
    """The data files under a folder (any depth; hidden ones and save_to_disk metadata skipped), in name order."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and not is_saved_dataset(p.parent))
    if not found:
        raise SwitchcitError(f"{folder} holds no data files ({', '.join(SUFFIXES)}): give a file or another folder")
    return found


def _file_rows(path: Path) -> Rows:
    """Rows of one file by its extension; any other name is read as JSONL, as before."""
    kind = SUFFIXES.get(path.suffix.lower(), "jsonl")
    if kind == "csv" or kind == "tsv":
        yield from _csv_rows(path, "," if kind == "csv" else "\t")
    elif kind == "parquet":
        yield from _parquet_rows(path)
    elif kind == "json" and _starts_an_array(path):
        yield from _json_array_rows(path)
    else:
        yield from _jsonl_rows(path)


def _not_text(where: object, exc: UnicodeDecodeError) -> SwitchcitError:
    return SwitchcitError(f"{where}: not UTF-8 text (byte {exc.start} cannot be decoded): save it as UTF-8, or "
                          "give Parquet")


def _json(text: str, where: object, whole_file: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f" at line {exc.lineno}, column {exc.colno}" if whole_file else ""
        raise SwitchcitError(f"{where}: malformed JSON ({exc.msg}{at}): fix or remove the row") from None
    except RecursionError:
        raise SwitchcitError(f"{where}: JSON nested too deeply: give flat rows") from None


def _jsonl_rows(path: Path) -> Rows:
    with path.open("rb") as handle:  # lines end at b"\n" only: U+2028 may stand inside a JSON string
        for number, raw in enumerate(handle, start=1):
            where = Where(str(path), number, by_line=True)
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_text(where, exc) from None
            if line.strip():
                yield where, _json(line, where)


def _starts_an_array(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _json_array_rows(path: Path) -> Rows:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from None
    for number, row in enumerate(_json(text, path, whole_file=True), start=1):
        yield Where(str(path), number), row


def _csv_rows(path: Path, delimiter: str) -> Rows:
    csv.field_size_limit(2**31 - 1)  # documents longer than csv's default 128 KiB cell are real data
    number = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, [])
            for cells in reader:
                number += 1
                where = Where(str(path), number)
                if len(cells) != len(header):
                    raise SwitchcitError(f"{where}: {len(cells)} cells where the header has {len(header)}: quote "
                                         "cells that hold the delimiter or a line break")
                yield where, dict(zip(header, cells))
    except UnicodeDecodeError as exc:
        raise _not_text(Where(str(path), number + 1), exc) from None
    except csv.Error as exc:
        raise SwitchcitError(f"{Where(str(path), number + 1)}: {exc}: fix the row") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _need_arrow(what: object, doing: str = "reading"):
    """pyarrow, with its parquet module loaded."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise SwitchcitError(f"{what}: {doing} it needs pyarrow: {EXTRA}") from None
    return pyarrow


def _need_datasets(what: object):
    try:
        import datasets
    except ImportError:
        raise SwitchcitError(f"{what}: reading it needs Hugging Face datasets: {EXTRA}") from None
    return datasets


def _parquet_rows(path: Path) -> Rows:
    pa = _need_arrow(path)
    number = 0
    try:
        # Buffered page reads, no pre-buffering: a row group is decoded a batch at a time, not held whole.
        parquet = pa.parquet.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield Where(str(path), number), row
    except (pa.ArrowException, OSError) as exc:
        raise SwitchcitError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None


def _saved_rows(folder: Path) -> Rows:
    datasets = _need_datasets(folder)
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets' failures come in many types; all mean an unreadable folder
        raise SwitchcitError(f"{folder}: not a readable save_to_disk folder ({_one_line(exc)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise SwitchcitError(f"{folder} holds the splits {', '.join(dataset)}: give one split's folder, e.g. "
                                 f"{folder / next(iter(dataset))}")
        dataset = next(iter(dataset.values()))
    number = 0
    for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for row in table.to_pylist():
            number += 1
            yield Where(str(folder), number), row


def _hub_rows(spec: str) -> Rows:
    """A hub dataset, streamed (nothing is downloaded in full); offline, one line says so."""
    name, _, split = spec.partition(":")
    shown = HUB + spec
    if not name.strip("/") or name.count("/") > 1:
        raise SwitchcitError(f"{shown}: give a hub dataset as hf:ORG/NAME or hf:ORG/NAME:SPLIT")
    datasets = _need_datasets(shown)
    _reach_hub(shown)
    number = 0
    try:
        for row in datasets.load_dataset(name, split=split or "train", streaming=True):
            number += 1
            yield Where(shown, number), row
    except ConnectionError:
        raise SwitchcitError(f"{shown}: the Hugging Face hub cannot be reached (offline): go online, or give a local "
                             "copy (a data file or a save_to_disk folder)") from None
    except Exception as exc:  # the hub's failures come in many types: a missing dataset or split, a gated one, ...
        raise SwitchcitError(f"{shown}: cannot load it from the Hugging Face hub ({_one_line(exc)})") from None


def _reach_hub(shown: str) -> None:
    """Fail at once when the hub is unreachable, instead of after the hub client's retries (~25 s)."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # the hub client reads its cache, or says it is offline
        return
    try:
        httpx.head(constants.ENDPOINT, timeout=10)
    except httpx.TransportError:
        raise SwitchcitError(f"{shown}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached (offline): go "
                             "online, or give a local copy (a data file or a save_to_disk folder)") from None


# -- writing ------------------------------------------------------------------------------------------

class RowWriter:
    """Rows appended to a JSONL, CSV, TSV or Parquet file as they come (flushed per call), closed on exit.
    Parquet fixes its schema with the first rows: `types` names the Arrow type of columns those rows may leave
    empty (e.g. {"confidence": "float64"}); other columns empty there are text."""

    def __init__(self, path: str | Path, types: dict[str, str] | None = None):
        self.path = Path(path)
        self.types = types or {}
        self.kind = self.path.suffix.lower()
        if self.kind not in WRITABLE:
            raise SwitchcitError(f"{self.path}: cannot write '{self.kind}' files: name it {' or '.join(WRITABLE)}")
        if self.kind == ".parquet":
            _need_arrow(self.path, "writing")
        self._handle: IO[str] | None = None
        self._csv: csv.DictWriter | None = None
        self._parquet = None

    def __enter__(self) -> RowWriter:
        return self

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.kind == ".parquet":
            self._write_parquet(rows)
            return
        if self._handle is None:
            self._handle = self.path.open("w", encoding="utf-8", newline="")
        if self.kind == ".jsonl":
            self._handle.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        else:
            if self._csv is None:
                columns = list(dict.fromkeys(key for row in rows for key in row))
                self._csv = csv.DictWriter(self._handle, columns, delimiter="\t" if self.kind == ".tsv" else ",")
                self._csv.writeheader()
            try:
                self._csv.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
            except ValueError as exc:  # a column the first rows did not have
                raise SwitchcitError(f"{self.path}: {exc}: rows with varying columns need JSONL") from None
        self._handle.flush()

    def _write_parquet(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self._parquet is None:
                schema = pa.schema(f.with_type(pa.type_for_alias(self.types[f.name])) if f.name in self.types
                                   else f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                   for f in pa.Table.from_pylist(rows).schema)
                self._parquet = pq.ParquetWriter(self.path, schema)
            self._parquet.write_table(pa.Table.from_pylist(rows, schema=self._parquet.schema))
        except (pa.ArrowException, KeyError) as exc:
            raise SwitchcitError(f"{self.path}: rows do not fit one Parquet schema ({exc}): write JSONL") from None

    def __exit__(self, *exc_info: object) -> None:
        if self._parquet is not None:
            self._parquet.close()  # the footer: the rows written so far form a valid file
        if self._handle is not None:
            self._handle.close()


def _cell(value: Any) -> Any:
    """A CSV cell: text as is, lists and objects (chat messages) as JSON."""
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value
