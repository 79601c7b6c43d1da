"""The input side of a batch job: checking a Parquet dataset before anything runs, and reading it with ids.

:func:`plan_input` runs on the driver and reads only Parquet footers (plus the id column when there is one),
so an unreadable file, a missing prompt column or one that does not hold strings, a clash with an output
column name, or null / duplicate ids fail the job in seconds, before Ray schedules anything or a model loads.
An input with 0 rows is valid: the runner finishes it at once with an empty result.

:class:`IdentifiedParquetDatasource` is the Ray Data read. It is a small custom datasource rather than
``ray.data.read_parquet`` because every row needs a stable id and ``read_parquet`` knows no row positions
(its ``row_hash`` is an opaque 64-bit hash of the absolute path). Here a row without an id column gets
``"<file relative to the input root>:<row position>"``, which survives moving the dataset and reads well in
the output. The read also drops rows whose ids a previous run already committed (resume).

Tokenization, inference and writing belong to :mod:`neox_ray.batch.stages` and :mod:`neox_ray.batch.sink`.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ID = "id"


class InputError(ValueError):
    """The input dataset cannot be processed as given (unreadable, missing columns, bad ids)."""


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (``s3://``, ``gs://``, ``file://``...) as (filesystem, path inside it)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), posixpath.abspath(path)


@dataclass(frozen=True)
class InputFile:
    path: str                # inside the filesystem
    relative: str            # to the input root: the stem of derived ids
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass
class InputPlan:
    root: str
    filesystem: pafs.FileSystem
    files: list[InputFile]
    schema: pa.Schema
    id_column: str | None    # the input's id column, or None when ids are derived from file + row position
    ids: pa.ChunkedArray | None = field(default=None, repr=False)  # the id column, when there is one
    text_column: str = ""    # the column the job reads: the prompt/text column, or the messages column
    is_chat: bool = False    # text_column holds chat messages (lists of {role, content})

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def derived_ids(self, input_file: InputFile, start: int, stop: int) -> pa.Array:
        return pa.array([f"{input_file.relative}:{row}" for row in range(start, stop)], type=pa.string())


def plan_input(path: str, required_column: str, id_column: str, reserved_columns: tuple[str, ...],
               messages_column: str | None = None) -> InputPlan:
    """Lists the input's files, checks their schemas and ids; raises :class:`InputError` with the reason.

    With ``messages_column``, an input that has no ``required_column`` but has that column is a chat input:
    its rows are lists of ``{role, content}`` messages, rendered with the model's chat template later."""
    filesystem, root = resolve_filesystem(path)
    try:
        info = filesystem.get_file_info(root)
    except OSError as exc:
        raise InputError(f"cannot access input {path}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {path} does not exist")
    if info.type == pafs.FileType.Directory:
        try:
            listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as exc:
            raise InputError(f"cannot list input directory {path}: {exc}") from None
        paths = sorted(i.path for i in listing if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, root).split("/")))
        if not paths:
            raise InputError(f"input directory {path} holds no .parquet files")
        base = root
    else:
        paths, base = [root], posixpath.dirname(root)

    files, schemas = [], []
    for file_path in paths:
        try:
            metadata = pq.ParquetFile(filesystem.open_input_file(file_path)).metadata
            schema = metadata.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow raises several types for corrupt or non-Parquet files
            raise InputError(f"cannot read input file {file_path}: {exc}") from None
        rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        files.append(InputFile(file_path, posixpath.relpath(file_path, base), rows))
        schemas.append((file_path, schema))

    is_chat = (messages_column is not None and all(required_column not in s.names for _, s in schemas)
               and all(messages_column in s.names for _, s in schemas))
    if is_chat:
        assert messages_column is not None
        required_column = messages_column
    for file_path, schema in schemas:
        if is_chat:
            _check_messages_type(file_path, messages_column or "", schema.field(required_column).type)
            continue
        if required_column not in schema.names:
            if messages_column is not None:
                raise InputError(f"input file {file_path} has no column {required_column!r} (prompts) and no column "
                                 f"{messages_column!r} (chat messages) (columns: "
                                 f"{', '.join(schema.names) or 'none'}); set --prompt-column or --messages-column")
            raise InputError(f"input file {file_path} has no column {required_column!r} (columns: "
                             f"{', '.join(schema.names) or 'none'}); set the column name option if it is named "
                             "differently")
        column_type = schema.field(required_column).type
        if not (_is_text(column_type) or pa.types.is_null(column_type)):
            raise InputError(f"input column {required_column!r} in {file_path} has Arrow type {column_type}; it "
                             f"must hold strings{_TEXT_TYPE_HINTS.get(_type_family(column_type), '')}")
    try:
        unified = pa.unify_schemas([s for _, s in schemas])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"input files have incompatible schemas: {exc}") from None
    if not is_chat and pa.types.is_null(unified.field(required_column).type):
        raise InputError(f"input column {required_column!r} has Arrow type null in every file (no values); it "
                         "must hold strings")
    clashes = [c for c in reserved_columns if c in unified.names]
    if clashes:
        raise InputError(f"input column(s) {', '.join(clashes)} would be overwritten by the job's output columns; "
                         "rename them")

    plan = InputPlan(base, filesystem, files, unified, id_column if id_column in unified.names else None,
                     text_column=required_column, is_chat=is_chat)
    if plan.id_column is None and ID in unified.names:
        raise InputError(f"input has an {ID!r} column but the id column is set to {id_column!r}; the output's "
                         f"{ID!r} column would overwrite it")
    if plan.id_column is not None:
        plan.ids = _read_and_check_ids(plan)
    return plan


_TEXT_TYPE_HINTS = {
    "binary": " (decode the bytes to UTF-8 text before writing the Parquet file)",
    "list": " (pre-tokenized prompts are not supported: pass the text)",
    "number": " (is the column name option pointing at the right column?)",
}


def _is_text(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):  # e.g. a pandas categorical column
        return _is_text(arrow_type.value_type)
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_string_view(arrow_type))


def _check_messages_type(file_path: str, column: str, arrow_type: pa.DataType) -> None:
    """A messages column is a list of structs with string ``role`` and ``content`` fields."""
    ok = (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) \
        and pa.types.is_struct(arrow_type.value_type) \
        and all(name in [f.name for f in arrow_type.value_type] for name in ("role", "content"))
    if not ok:
        raise InputError(f"input column {column!r} in {file_path} has Arrow type {arrow_type}; chat messages must "
                         "be a list of {role: string, content: string} structs")


def _type_family(arrow_type: pa.DataType) -> str:
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or \
            pa.types.is_fixed_size_binary(arrow_type) or pa.types.is_binary_view(arrow_type):
        return "binary"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return "list"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "number"
    return "other"


def _read_and_check_ids(plan: InputPlan) -> pa.ChunkedArray:
    column = plan.id_column
    chunks = []
    for input_file in plan.files:
        try:
            ids = pq.read_table(input_file.path, columns=[column], filesystem=plan.filesystem).column(column)
        except Exception as exc:
            raise InputError(f"cannot read id column {column!r} of {input_file.path}: {exc}") from None
        if ids.null_count:
            first = pc.index(pc.is_null(ids), True).as_py()
            raise InputError(f"id column {column!r} has {ids.null_count} null value(s) in {input_file.path} "
                             f"(first at row {first}); every row needs an id, or drop the column to derive ids")
        chunks.extend(ids.chunks)
    try:
        ids = pa.chunked_array(chunks)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"id column {column!r} has different types across files: {exc}") from None
    if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise InputError(f"id column {column!r} must hold integers or strings, got {ids.type}")
    counts = pa.table({"id": ids}).group_by("id").aggregate([("id", "count")])
    duplicated = counts.filter(pc.greater(counts["id_count"], 1))
    if duplicated.num_rows:
        examples = ", ".join(f"{v!r} ({c} times)" for v, c in zip(duplicated["id"].to_pylist()[:3],
                                                                  duplicated["id_count"].to_pylist()[:3], strict=True))
        raise InputError(f"id column {column!r} has {duplicated.num_rows} duplicated value(s), e.g. {examples}; "
                         "ids must be unique")
    return ids


@dataclass(frozen=True)
class _ReadUnit:
    file: InputFile
    row_group: int
    first_row: int           # position in the file of the row group's first row


class IdentifiedParquetDatasource:
    """Builds the Ray Data read: one read task per row group, yielding blocks of ``rows_per_block`` rows with
    an ``id`` column and without the rows in ``skip_ids`` (ids committed by an earlier run)."""

    def __init__(self, plan: InputPlan, rows_per_block: int, skip_ids: pa.Array | None = None):
        self.plan = plan
        self.rows_per_block = rows_per_block
        self.skip_ids = skip_ids if skip_ids is not None and len(skip_ids) else None

    def units(self) -> list[_ReadUnit]:
        units = []
        for input_file in self.plan.files:
            first = 0
            for index, rows in enumerate(input_file.row_group_rows):
                if rows:
                    units.append(_ReadUnit(input_file, index, first))
                first += rows
        return units

    def as_ray_datasource(self):
        """A ``ray.data.Datasource`` (imported lazily so the planning half works without Ray)."""
        import ray
        from ray.data import Datasource, ReadTask
        from ray.data.block import BlockMetadata

        # Read tasks carry neither the id column nor the skip set inline: a plan without ids, and one
        # object-store reference to the skip set shared by every task.
        plan = dataclasses.replace(self.plan, ids=None)
        skip_ref = ray.put(self.skip_ids) if self.skip_ids is not None else None
        rows_per_block, units = self.rows_per_block, self.units()

        class _Datasource(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                return None

            def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                               data_context: Any = None) -> list[ReadTask]:
                tasks = []
                for unit in units:
                    rows = unit.file.row_group_rows[unit.row_group]
                    metadata = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                             input_files=(unit.file.path,))
                    read = functools.partial(_read_unit, plan, unit, rows_per_block, skip_ref)
                    tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
                return tasks

            def get_name(self) -> str:
                return "ReadParquetWithIds"

        return _Datasource()


def _read_unit(plan: InputPlan, unit: _ReadUnit, rows_per_block: int, skip_ref: Any) -> Iterator[pa.Table]:
    with plan.filesystem.open_input_file(unit.file.path) as handle:
        table = pq.ParquetFile(handle).read_row_group(unit.row_group)
    table = _conform(table, plan.schema)
    if plan.id_column is None:
        table = table.append_column(ID, plan.derived_ids(unit.file, unit.first_row, unit.first_row + table.num_rows))
    elif plan.id_column != ID:
        table = table.append_column(ID, table.column(plan.id_column))
    if skip_ref is not None:
        import ray

        table = table.filter(pc.invert(pc.is_in(table.column(ID), value_set=ray.get(skip_ref))))
    for start in range(0, table.num_rows, rows_per_block):
        yield table.slice(start, rows_per_block)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Every block gets the unified schema (a column missing from one file becomes nulls) so blocks concat."""
    columns = []
    for schema_field in schema:
        if schema_field.name in table.column_names:
            column = table.column(schema_field.name)
            columns.append(column if column.type == schema_field.type else column.cast(schema_field.type))
        else:
            columns.append(pa.nulls(table.num_rows, schema_field.type))
    return pa.table(columns, schema=schema)
