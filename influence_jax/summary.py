"""A TensorBoard event-file writer that needs no TensorFlow: scalars, text and PNG images."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping

from tensorboard.compat.proto import (
    event_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG IHDR colour type -> Summary.Image colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
_PNG_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class SummaryError(ValueError):
    """A writer used after close(), or an image that is not a PNG."""


_FILE_IDS = itertools.count()


class EventFile:
    """One TensorBoard event file in a local folder, written without TensorFlow.

    TensorBoard's own EventFileWriter goes through `tensorboard.compat.tf`, which imports
    TensorFlow wherever it is installed (7 s at every start of a run on a 2-core EPYC, for
    nothing). Records are TensorBoard's (its RecordWriter); the file is named as its writer
    names them; it is flushed at most every `flush_secs`, and on flush() and close().
    """

    def __init__(self, logdir: str, filename_suffix: str = "", flush_secs: float = 120):
        os.makedirs(logdir, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_IDS)}{filename_suffix}"
        )
        self.path = os.path.join(logdir, name)
        self._records = RecordWriter(open(self.path, "wb"))
        self._flush_secs = flush_secs
        self._flushed = time.monotonic()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_event(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._flushed >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        self._records.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def event_file(logdir: str, filename_suffix: str = "", flush_secs: float = 120):
    """A writer of one new event file in `logdir`: EventFile where the folder is local, else
    TensorBoard's EventFileWriter (its file systems: gs://, s3://, ...)."""
    if "://" not in logdir:
        return EventFile(logdir, filename_suffix, flush_secs)
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return EventFileWriter(logdir, filename_suffix=filename_suffix, flush_secs=flush_secs)


class SummaryWriter:
    """Writes scalars, markdown text and PNG images as TensorBoard events, without TensorFlow.

    Construct it with `enabled=jax.process_index() == 0`: a disabled writer creates no
    file and every method is a no-op, so callers need no `if` around each write.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True, flush_secs: int = 120):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self._writer = event_file(self.logdir, flush_secs=flush_secs) if enabled else None

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if self._writer is None:
            raise SummaryError(f"SummaryWriter({self.logdir}): written to after close()")
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def restart(self, step: int) -> None:
        """Marks a resume at `step` (TensorBoard's SessionLog START): readers drop what a
        stopped run logged at this step or later before the checkpoint it resumes from (its
        steps after that checkpoint are trained and logged again), so no step shows twice."""
        if not self.enabled:
            return
        log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), session_log=log)
        )

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        """Writes each `values[tag]` under `prefix + tag` (e.g. prefix "eval/")."""
        if not self.enabled:
            return
        summary_values = []
        for tag, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise SummaryError(f"scalars: {tag!r} is not a number ({value!r})") from None
            summary_values.append(summary_pb2.Summary.Value(tag=prefix + tag, simple_value=number))
        self._write(step, summary_values)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars(step, {tag: value})

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Writes markdown for TensorBoard's Text tab."""
        if not self.enabled:
            return
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[markdown.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        meta = text_metadata.create_summary_metadata(display_name=tag, description="")
        self._write(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def image(
        self,
        tag: str,
        png_bytes: bytes,
        step: int,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """Writes an encoded PNG (e.g. from matplotlib `savefig(format="png")`).

        Args:
          height, width: pixels; read from the PNG header when not given.
        """
        if not self.enabled:
            return
        if png_bytes[:8] != _PNG_SIGNATURE or len(png_bytes) < 26:
            raise SummaryError(f"image {tag!r}: png_bytes is not an encoded PNG")
        png_width, png_height = struct.unpack(">II", png_bytes[16:24])
        image = summary_pb2.Summary.Image(
            height=png_height if height is None else int(height),
            width=png_width if width is None else int(width),
            colorspace=_PNG_COLORSPACE.get(png_bytes[25], 4),
            encoded_image_string=bytes(png_bytes),
        )
        self._write(step, [summary_pb2.Summary.Value(tag=tag, image=image)])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; later writes raise. Safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
