#!/usr/bin/env bash
# Submit an encode job to a Ray cluster from a laptop: the same command as a local run.
#
#   RAY_ADDRESS=http://head-node:8265 jobs/submit_encode.sh configs/sd15-512.yaml \
#       's3://bucket/train-{000000..000999}.tar' s3://bucket/latents/sd15-512
#
# The working directory is shipped with the job; the cluster's image must have latentcache's
# dependencies (or add them under runtime_env.pip in jobs/runtime_env.yaml). Credentials for S3
# come from the cluster nodes' environment (instance roles), or are forwarded from this shell by the
# driver when set. Resubmitting the same job resumes it: committed shards are skipped.
set -euo pipefail
config=${1:?usage: submit_encode.sh CONFIG INPUT OUTPUT [extra latentcache flags]}
input=${2:?input URL(s)}
output=${3:?output URL}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
exec ray job submit \
  --address "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard, e.g. http://head:8265}" \
  --working-dir "$here" \
  --runtime-env "$here/jobs/runtime_env.yaml" \
  -- python -m pipeline.cli encode --config "$config" --input "$input" --output "$output" \
     --address auto --no-progress "$@"
