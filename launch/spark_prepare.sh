#!/usr/bin/env bash
# Prepare a dataset on Apache Spark with spark-submit (tools/prepare_data.py --engine=spark;
# docs/spark.md). The output folder must be one path that the driver and every executor see
# (a shared mount on a cluster); the executors' Python needs influence_jax installed.
#
#   launch/spark_prepare.sh MASTER OUTPUT [prepare_data.py flags...]
#   launch/spark_prepare.sh yarn /mnt/shared/prepared/taobao --source=taobao \
#     --input=table:logs.user_behavior --num_buckets=4096
#   DRY_RUN=1 launch/spark_prepare.sh local[8] /tmp/out --source=taobao --input=log.csv
#
# Environment (defaults in brackets): SPARK_SUBMIT [spark-submit, else PySpark's own],
# PYSPARK_PYTHON [python3: the executors' interpreter], DRIVER_MEMORY [8g: the driver gathers
# the vocabularies and appends the parts], EXECUTOR_MEMORY [8g], EXECUTOR_CORES [4],
# HIVE [0; 1: read table: inputs from the Hive metastore], SPARK_ARGS [more spark-submit words,
# e.g. "--num-executors 100 --conf spark.yarn.maxAppAttempts=1"].
set -euo pipefail
usage="usage: launch/spark_prepare.sh MASTER OUTPUT [prepare_data.py flags...]"
if (($# < 2)); then
  echo "launch/spark_prepare.sh: needs MASTER and OUTPUT; $usage" >&2
  exit 2
fi
master=$1
output=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
submit=${SPARK_SUBMIT:-}
if [[ -z "$submit" ]]; then
  if command -v spark-submit >/dev/null; then
    submit=spark-submit
  else
    submit="$(python3 -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' \
      2>/dev/null || echo /opt/spark)/bin/spark-submit"
  fi
fi
python=${PYSPARK_PYTHON:-python3}
cmd=("$submit" --master "$master"
  --driver-memory "${DRIVER_MEMORY:-8g}"
  --executor-memory "${EXECUTOR_MEMORY:-8g}"
  --executor-cores "${EXECUTOR_CORES:-4}"
  --conf "spark.pyspark.python=$python"
  --conf "spark.pyspark.driver.python=$python")
if [[ "${HIVE:-0}" == 1 ]]; then
  cmd+=(--conf spark.sql.catalogImplementation=hive)
fi
if [[ -n "${SPARK_ARGS:-}" ]]; then
  read -r -a extra <<<"$SPARK_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=("$here/tools/prepare_data.py" --engine=spark --output="$output" "$@")
if [[ "${DRY_RUN:-0}" != [01] ]]; then
  echo "launch/spark_prepare.sh: DRY_RUN=${DRY_RUN} must be 0 or 1" >&2
  exit 2
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
