"""The service's own Prometheus metrics, next to BentoML's request metrics on the same
`/metrics`. BentoML runs prometheus_client in multiprocess mode, so gauges say how
workers combine (`livemostrecent`: the newest value of a live worker); Info metrics
do not work there, so the served version is a 0/1 gauge with the version as a label."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Video generation spans milliseconds (tiny models on a CPU) to minutes (SVD on a GPU).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

FRAMES_GENERATED = Counter("vdm_serving_frames_generated", "Frames returned to callers", ["endpoint"])
GENERATION_FAILURES = Counter("vdm_serving_generation_failures", "Generations that raised (HTTP 500)", ["endpoint"])
DENOISING_STEP_SECONDS = Histogram(
    "vdm_serving_denoising_step_seconds", "Wall time of one sampler step", ["endpoint"], buckets=STEP_BUCKETS
)
MODEL_LOAD_SECONDS = Histogram(
    "vdm_serving_model_load_seconds", "Download and load of a model version", ["model"], buckets=LOAD_BUCKETS
)
SERVED_MODEL = Gauge(
    "vdm_serving_model_info",
    "1 for the version each served model is served from, 0 for versions it served before",
    ["model", "version", "alias", "kind", "endpoint"],
    multiprocess_mode="livemostrecent",
)
GPU_MEMORY_BYTES = Gauge(
    "vdm_serving_gpu_memory_bytes",
    "CUDA memory of this worker: allocated by tensors, reserved by the caching allocator (absent on the CPU)",
    ["memory"],
    multiprocess_mode="livemostrecent",
)
GENERATIONS_RUNNING = Gauge(
    "vdm_serving_generations_running",
    "Generations computing now, each holding one of max_concurrency slots until its sampler has stopped",
    multiprocess_mode="livesum",
)
GENERATIONS_PEAK = Gauge(
    "vdm_serving_generations_peak",
    "The most generations that computed at once since the worker started",
    multiprocess_mode="livemax",
)
GENERATIONS_CANCELLED = Counter(
    "vdm_serving_generations_cancelled",
    "Generations stopped between two denoising steps: timeout (the request's deadline passed), disconnect or shutdown",
    ["reason"],
)
TASKS_QUEUED = Gauge(
    "vdm_serving_tasks_queued", "Submitted tasks waiting for a generation slot or running", multiprocess_mode="livesum"
)
