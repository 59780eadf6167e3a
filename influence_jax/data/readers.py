"""Per-source readers of raw interaction logs, streamed as chunks of validated events.

Each source (Taobao UserBehavior, MovieLens 100K, Retailrocket CML, a generic events CSV/Parquet)
becomes an `EventSource`: its behaviour types, its event files and optional user/item side tables.
`EventSource.chunks` parses CSV with pyarrow's streaming reader (gzip by magic bytes, UTF-8 BOM,
CRLF and a missing final newline handled) and yields `EventChunk`s with the same roles for every
source. A malformed row raises one `DataError` naming the file and line, or with `lenient` is
counted in a `Tally` and skipped.

The parsing lives in logio.py and the sources in sources.py; this module is their front door.
"""

from __future__ import annotations

from influence_jax.data.logio import (  # noqa: F401  (re-exported)
    REASONS,
    ROLES,
    TABLE_PREFIX,
    EventChunk,
    EventFile,
    SideTable,
    Tally,
    convert,
    fail_row,
    iter_file,
    open_stream,
    read_header,
)
from influence_jax.data.schema import DataError
from influence_jax.data.sources import (  # noqa: F401  (re-exported)
    ML_AGE_EDGES,
    ML_RATINGS,
    ML_ZIP_PREFIX,
    RETAILROCKET_BEHAVIOURS,
    SOURCES,
    TAOBAO_BEHAVIOURS,
    TAOBAO_COLUMNS,
    TAOBAO_WINDOW,
    EventSource,
    SourceSpec,
    events,
    movielens,
    read_table,
    retailrocket,
    side_table,
    taobao,
)
from influence_jax.data.timefmt import TIME_FORMAT_HELP, TIME_FORMATS  # noqa: F401


def open_source(source: str, path: str, **kwargs) -> EventSource:
    """The reader of `source` (a name of SOURCES: taobao, movielens, retailrocket, events)."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    if source != "events" and kwargs:
        raise DataError(
            f"{source}: column-mapping options {sorted(kwargs)} only apply to --source=events"
        )
    return SOURCES[source].open(path, **kwargs)
