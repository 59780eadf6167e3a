"""TensorBoard HParams summaries for a sweep, written without TensorFlow.

The sweep root gets one experiment summary (the swept fields and the metrics to compare); each
trial's workdir gets a session-start summary (its values) and, when it ends, a session-end
summary (its status). The metrics are the scalars training already writes there ("valid/auc",
"test/auc", ...), so `tensorboard --logdir DIR` shows every trial in the HParams tab. The protos
are the hparams plugin's own (tensorboard.plugins.hparams); only TensorFlow's summary ops are
avoided, the same way summary.SummaryWriter writes scalars.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from influence_jax import summary

SUFFIX = ".hparams"  # event files of this module end with it
_TYPES = {
    "bool_value": api_pb2.DATA_TYPE_BOOL,
    "number_value": api_pb2.DATA_TYPE_FLOAT64,
    "string_value": api_pb2.DATA_TYPE_STRING,
}


def _write(logdir: str, tag: str, data: plugin_data_pb2.HParamsPluginData) -> None:
    value = summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
    )
    writer = summary.event_file(logdir, filename_suffix=SUFFIX)
    writer.add_event(
        event_pb2.Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=[value]))
    )
    writer.close()


def _value(v: Any) -> tuple[str, Any]:
    """(proto field, value) of one hyperparameter value; sequences are shown as their repr."""
    if isinstance(v, bool):
        return "bool_value", v
    if isinstance(v, int | float):
        return "number_value", float(v)
    return "string_value", _text(v)


def _text(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)


def write_experiment(
    logdir: str, values: Mapping[str, Sequence[Any]], metric_tags: Sequence[str]
) -> None:
    """Writes the experiment summary (once: an existing one is kept) into the sweep root.

    Args:
      values: per swept field, the values trials take (for the domain of discrete fields).
      metric_tags: scalar tags to compare, e.g. ("valid/auc", "test/auc").
    """
    if glob.glob(os.path.join(logdir, f"events.out.tfevents.*{SUFFIX}")):
        return
    infos = []
    for name, vals in values.items():
        fields = {_value(v)[0] for v in vals}
        field = fields.pop() if len(fields) == 1 else "string_value"
        info = api_pb2.HParamInfo(name=name, type=_TYPES[field])
        shown = [_value(v)[1] if field != "string_value" else _text(v) for v in vals]
        for v in dict.fromkeys(shown):  # distinct, in order
            setattr(info.domain_discrete.values.add(), field, v)
        infos.append(info)
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags],
    )
    data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
    _write(logdir, metadata.EXPERIMENT_TAG, data)


def write_session_start(logdir: str, values: Mapping[str, Any], group: str = "") -> None:
    """Records a trial's hyperparameter values in its workdir."""
    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for name, v in values.items():
        field, val = _value(v)
        setattr(info.hparams[name], field, val)
    os.makedirs(logdir, exist_ok=True)
    data = plugin_data_pb2.HParamsPluginData(session_start_info=info)
    _write(logdir, metadata.SESSION_START_INFO_TAG, data)


def write_session_end(logdir: str, ok: bool) -> None:
    """Records that a trial ended, successfully or not."""
    status = api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    _write(logdir, metadata.SESSION_END_INFO_TAG, data)
