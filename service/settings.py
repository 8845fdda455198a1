"""The one configuration object of counterlens.

Built once by the composition root (:mod:`service.container`) and passed down; nothing reads it as a
global. Environment variables use the prefix ``COUNTERLENS_`` and ``__`` between a group and its field,
for example ``COUNTERLENS_DATA_DIR=/srv/cl`` or ``COUNTERLENS_SCORING__REVIEW_THRESHOLD=0.4``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("counterlens", appauthor=False))


class StorageSettings(BaseModel):
    # Empty means SQLite at <data_dir>/counterlens.sqlite3.
    database_url: str = ""
    echo_sql: bool = False


# The image models :mod:`embeddings.registry` builds (tests/embeddings/test_registry.py keeps the two lists one).
# Named here so that a misspelt model is refused with the other settings, before anything loads.
IMAGE_MODEL_NAMES: tuple[str, ...] = ("sscd", "sscd_distilled", "effnet", "effnet_int8", "openclip")


class ModelSettings(BaseModel):
    # Which registered backend provides each role.  ``copy`` finds re-used/edited official photos;
    # ``semantic`` finds lookalikes (another photo of the same product).  The default copy model is
    # SSCD's distilled MobileNetV4 student: ~3x the throughput of full SSCD (ResNet-50 at 320 px) on
    # CPU; ``sscd`` is the choice where a GPU is available (see docs/quality.md for both).
    copy_model: str = "sscd_distilled"
    # The lookalike model: EfficientNet-Lite0 quantised to int8 (2.1x the fp32 ``effnet``'s speed on CPU,
    # cosine 0.994 to its vectors; docs/quality.md "int8 lookalike model"). Empty: no lookalike signal.
    semantic_model: str = "effnet_int8"
    logo_model: str = ""  # empty: the copy model also searches logos
    # open_clip: an architecture plus either a hub tag (``laion2b_s34b_b79k``) or a local checkpoint.
    openclip_arch: str = "ViT-B-32"
    openclip_pretrained: str = ""
    openclip_checkpoint: Path | None = None
    # ``cpu``; ``cuda`` (fails at start if CUDA is not available); ``auto`` (CUDA when available).
    provider: Literal["cpu", "cuda", "auto"] = "cpu"
    # 0: the cores shared out among the loaded image models. Each model runs in its own batcher thread(s),
    # so two models with one thread each keep both cores of a small machine busy in parallel (measured
    # on 2 cores: 65 photos/s through sscd_distilled + effnet, against 38 with ONNX Runtime's default
    # of one thread per core for each, whose pools then fight over the same cores).
    intra_op_threads: int = Field(default=0, ge=0, description="0: the cores shared out among the models")
    # The cores this process has to itself, which "auto" and 0 above are sized by; 0: the machine's.
    # Set for each of several processes on one machine (API workers, rescan processes: for_cores).
    process_cores: int = Field(default=0, ge=0, le=4096)
    max_batch: int = Field(default=16, ge=1, le=256)
    # How long a model waits for company before it runs a batch that is not full. "auto": no wait
    # where the model runs on the CPU, 2 ms on a GPU. On this 2-core CPU a batch costs no less a photo
    # than single photos (effnet 4.4 ms a photo alone, 5.6 in batches of 16; docs/performance.md), so
    # waiting only idles the core: 8.7 against 10.4 ms median latency at one request at a time. Batches
    # still form by themselves under load (what queued while the model ran goes together).
    batch_wait_ms: Annotated[float, Field(ge=0, le=100)] | Literal["auto"] = "auto"
    # Photos per model call: the batch a model takes (up to max_batch) is run this many at a time.
    # "auto": one at a time on the CPU, the whole batch on a GPU. On the 2-core VM the two models side
    # by side embed 196 photos/s one at a time and 185 in batches of 4 (scripts/bench_score.py's raw
    # figures: a batch's activations outgrow the 2 MB L2 cache of a core), and the service scored 7.7 %
    # more listings/s at concurrency 16 and 2.3 % more at 8 this way (docs/performance.md, session 34).
    run_batch: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # The model threads the image models share: each runs whichever model has the request that has
    # waited longest (embeddings/thread_batcher.py, ModelThreads). "auto": on the CPU, as many as the
    # process's cores hold of each model's ONNX Runtime threads (2 cores, one each: 2); on a GPU, a
    # thread of its own per model. A number: that many shared threads. (Shared threads do not wait for
    # company: with a non-zero batch_wait_ms each model keeps a thread of its own.) On the CPU the copy
    # model costs twice the lookalike model a photo (sscd_distilled 5.1 ms, effnet_int8 2.3 ms), so with
    # a thread each the lookalike model's core idled half the time; docs/performance.md, session 37.
    shared_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # A listing's JPEG photo at least twice the side the whole-photo models resize to is decoded for
    # them at 1/2, 1/4 or 1/8 of its size (never below that side): a 2000x1500 photo cost both models
    # 50.8 ms with its decode, 14.7 ms this way, for vectors at cosine >= 0.997 (docs/performance.md).
    # Crops, keypoints, OCR and the boxes reported still read the whole photo. False: the models
    # embed the whole photo too.
    reduced_decode: bool = True

    @field_validator("copy_model", "semantic_model", "logo_model")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        # The copy model is required; the other two may be empty (no lookalike signal; the copy model
        # searches logos).
        if (name or info.field_name == "copy_model") and name not in IMAGE_MODEL_NAMES:
            raise ValueError(f"unknown image model {name!r}; one of: {', '.join(IMAGE_MODEL_NAMES)}")
        return name

    def wait_ms_for(self, provider: str) -> float:
        """The batch wait of a model running on ``provider`` (``cpu`` or ``cuda``)."""
        if self.batch_wait_ms == "auto":
            return 0.0 if provider == "cpu" else 2.0
        return float(self.batch_wait_ms)

    def shared_threads_for(self, provider: str, cores: int, intra_op_threads: int) -> int | None:
        """The model threads the models share on ``provider`` (``cpu`` or ``cuda``) in a process with
        ``cores`` cores to itself, whose models run ``intra_op_threads`` ONNX Runtime threads each; None:
        a thread of its own per model."""
        if self.shared_threads != "auto":
            return self.shared_threads
        if provider != "cpu":
            return None
        return max(1, cores // max(1, intra_op_threads))

    def cores(self) -> int:
        """The cores this process has to itself: ``process_cores``, else the machine's."""
        return self.process_cores or os.cpu_count() or 1

    def intra_threads_for(self, models: int, cores: int | None = None) -> int:
        """ONNX Runtime threads per model: ``intra_op_threads``, or where it is 0 the cores (``cores``,
        else :meth:`cores`) shared out among the ``models``, which run side by side, at least one each."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (cores or self.cores()) // max(1, models))

    def for_cores(self, cores: int, models: int) -> ModelSettings:
        """These settings for a process with ``cores`` cores to itself (one of several API workers or
        rescan processes on the machine) loading ``models`` image models: what is left to us (ONNX
        Runtime threads 0, shared threads "auto") is sized by that share, not by the machine's cores,
        which every process would otherwise take for itself. Two API workers on 2 cores with two shared
        model threads each: 203.6 listings/s at c=32, 0.78 of raw; with one each, 214.6 (0.82)
        (docs/performance.md, session 39). Shared threads "auto" are fixed here only on the CPU: with
        provider "auto" they are sized where the provider is known (``process_cores``), so that on a
        GPU each model keeps a thread of its own."""
        cores = max(1, cores)
        updates: dict[str, object] = {"process_cores": cores}
        intra = updates["intra_op_threads"] = self.intra_threads_for(models, cores)
        if self.shared_threads == "auto" and self.provider == "cpu":
            updates["shared_threads"] = self.shared_threads_for("cpu", cores, intra)
        return self.model_copy(update=updates)

    def run_batch_for(self, provider: str, fixed_batch: int | None = None) -> int:
        """The photos per model call of a model running on ``provider`` (``cpu`` or ``cuda``). A model
        exported with a fixed batch is fed that many rows a call whatever it is given (the embedder pads
        the rest), so its calls are a whole number of its batches: one photo a call would cost it a
        whole batch each."""
        n = (1 if provider == "cpu" else self.max_batch) if self.run_batch == "auto" else self.run_batch
        return n if fixed_batch is None else -(-n // fixed_batch) * fixed_batch
    ocr: Literal["cascade", "always", "never"] = "cascade"
    # Text is detected on the photo resized to this longer side (embeddings/ocr.py, scripts/bench_ocr.py).
    ocr_detect_side: int = Field(default=480, ge=64, le=4096)
    # Lines recognised per photo, those with the largest lettering (0: every line detected).
    ocr_max_lines: int = Field(default=6, ge=0, le=256)
    # OCR's ONNX Runtime threads (0: ONNX Runtime's default pool, one spinning thread per core). The
    # cascade's pool reads photos in parallel already.
    ocr_threads: int = Field(default=1, ge=0, le=256)


class IndexSettings(BaseModel):
    # Exact inner-product search up to this many vectors per index, an approximate index above it.
    exact_max: int = Field(default=200_000, ge=1)
    approximate: Literal["hnsw", "ivfpq"] = "hnsw"
    hnsw_m: int = Field(default=32, ge=4, le=128)
    hnsw_ef_construction: int = Field(default=80, ge=8)
    hnsw_ef_search: int = Field(default=64, ge=8)
    top_k: int = Field(default=10, ge=1, le=100)
    # FAISS's OpenMP threads for each search, in every thread; 0: one per core. See index/runtime.py.
    search_threads: int = Field(default=1, ge=0, le=256)


class KeypointSettings(BaseModel):
    # SIFT keypoints verified geometrically against every reference image (the ``keypoints`` signal):
    # finds a product cut out onto a new scene and other photos of the same packaging, which whole-photo
    # embeddings miss (docs/quality.md). ~35 ms a photo on one core here, so cascaded by default: run
    # where a verified product could change the verdict. "never" turns the signal off.
    mode: Literal["cascade", "always", "never"] = "cascade"
    max_side: int = Field(default=480, ge=64, le=4096)
    # Smaller photos are upscaled to this: 256 (the size of many marketplace thumbnails) costs 19 ms a
    # photo here against 28 ms at 320, and found as many natural photos on the quality benchmark.
    min_side: int = Field(default=256, ge=32, le=4096)
    max_features: int = Field(default=400, ge=8, le=4000)
    # OpenCV's threads (process-wide: SIFT, resizing, template matching); 0: its default, one per core.
    # The service runs photos in parallel already (the scoring pool), and OpenCV's own threads on top
    # cost CPU: SIFT of a 256 px photo took 21 ms of CPU with 2 threads against 19 with one (2 cores).
    opencv_threads: int = Field(default=1, ge=0, le=256)
    # A reference is reported from this many inliers (the signal counts from scoring.keypoints_floor).
    min_inliers: int = Field(default=8, ge=3)
    ratio: float = Field(default=0.8, gt=0, le=1)
    # Exact descriptor search up to this many reference keypoints, HNSW above. Two neighbours per
    # descriptor need a small beam: efSearch 16 halves the search of 48 with the same inliers (measured
    # on the quality benchmark: 8 against 16.5 ms a photo of 400 keypoints).
    exact_max: int = Field(default=4096, ge=1)
    hnsw_ef_search: int = Field(default=16, ge=2)

    @model_validator(mode="after")
    def _sides(self) -> KeypointSettings:
        if self.min_side > self.max_side:
            raise ValueError("keypoints.min_side must not exceed keypoints.max_side")
        return self


class LogoTemplateSettings(BaseModel):
    # Logo references looked for in the photos by silhouette and colour (template matching: see
    # index/logo_templates.py). Their matches are ``logo`` matches with ``method: "template"``, on the logo
    # ramp. ~8-12 ms a logo and photo here, so cascaded by default (see cascade_every_logo_up_to);
    # "always" looks for every logo in every photo.
    mode: Literal["cascade", "always", "never"] = "cascade"
    work_side: int = Field(default=320, ge=64, le=2048)
    # The sizes looked for: the mark's long side as a fraction of the photo's long side.
    min_width: float = Field(default=0.08, gt=0, lt=1)
    max_width: float = Field(default=0.5, gt=0, le=1)
    colour_sigma: float = Field(default=50.0, gt=0)
    # Positions per logo re-scored at ``work_side`` (one per band of sizes found at half that).
    candidates: int = Field(default=4, ge=1, le=20)
    # The cascade looks for every logo while the catalog has at most this many (a logo of another brand
    # pasted on a brand's product), above it only for the candidate brands' logos (~8-12 ms a logo).
    cascade_every_logo_up_to: int = Field(default=16, ge=0)

    @model_validator(mode="after")
    def _widths(self) -> LogoTemplateSettings:
        if self.min_width >= self.max_width:
            raise ValueError("logo_templates.min_width must be below logo_templates.max_width")
        return self


class ScoringSettings(BaseModel):
    review_threshold: float = Field(default=0.5, ge=0, le=1)
    likely_threshold: float = Field(default=0.8, ge=0, le=1)
    # Logo search by embedding ~35 crops of each photo (~35 embeddings a photo): "cascade" runs it where
    # the cheap signals leave a listing undecided, "always" on every photo. Off by default: on the
    # quality benchmark the cascade's crop search changed 1 of 1,516 figures and no metric (logo
    # templates and keypoint verification find what it found), at ~205 ms per listing it ran on
    # (docs/quality.md, "Logo search in crops, after templates and keypoints").
    logo_search: Literal["cascade", "always", "never"] = "never"
    # Similarities at which the copy / lookalike / logo signals start to count and are certain.
    # Calibrated on the tune split of scripts/eval_detection.py (docs/quality.md).
    copy_floor: float = 0.30
    copy_certain: float = 0.60
    lookalike_floor: float = 0.45
    lookalike_certain: float = 0.85
    logo_floor: float = 0.30
    logo_certain: float = 0.50
    # Keypoint matches report inliers / (inliers + 20): 0.333 counts from 10 inliers, 0.5 is 20. Unrelated
    # photos reach 4-5 inliers; chosen on the tune split (docs/quality.md).
    keypoints_floor: float = 0.333
    keypoints_certain: float = 0.50
    # Units of a currency per 1 USD; prices in other currencies are converted through USD.
    currency_rates: dict[str, float] = Field(
        default_factory=lambda: {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CNY": 7.2, "JPY": 150.0,
                                 "SEK": 10.5, "CHF": 0.88, "CAD": 1.37, "AUD": 1.52}
    )

    @model_validator(mode="after")
    def _ordered(self) -> ScoringSettings:
        if self.review_threshold > self.likely_threshold:
            raise ValueError("scoring.review_threshold must not exceed scoring.likely_threshold")
        return self

    @field_validator("currency_rates")
    @classmethod
    def _rates_positive(cls, v: dict[str, float]) -> dict[str, float]:
        rates = {k.upper(): r for k, r in v.items()}
        bad = [k for k, r in rates.items() if not r > 0]
        if bad:
            raise ValueError(f"scoring.currency_rates must be positive, not for {bad}")
        if "USD" not in rates:
            raise ValueError("scoring.currency_rates must contain USD")
        return rates


class IntakeSettings(BaseModel):
    max_images: int = Field(default=8, ge=1, le=64)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # The whole body of one request (a multipart upload, a JSON body, a batch), read no further than this:
    # "auto" is what one listing's photos may weigh in base64, plus 1 MiB for the rest. Without it an
    # upload was spooled whole before a photo's own limit applied (a 200 MB part was written to disk).
    max_request_bytes: Annotated[int, Field(ge=1024)] | Literal["auto"] = "auto"
    max_pixels: int = Field(default=40_000_000, ge=10_000)
    max_side: int = Field(default=12_000, ge=64)
    fetch_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Threads resolving the names of image URLs (a lookup that times out keeps its thread until the
    # resolver gives up: see SafeFetcher).
    dns_threads: int = Field(default=64, ge=1, le=1024)
    # Names of one registered domain looked up at once (each on a DNS thread); a further name of the
    # domain is refused at once (fetch_failed) until one returns. Callers asking for the same name share
    # its lookup. Bounds what names made up under a domain whose DNS never answers can hold (SafeFetcher).
    dns_lookups_per_domain: int = Field(default=8, ge=1, le=1024)
    max_redirects: int = Field(default=3, ge=0, le=10)
    # Only for tests and closed networks: hosts (exact names) that may resolve to private addresses.
    allow_private_hosts: list[str] = Field(default_factory=list)

    def request_limit(self) -> int:
        """The most bytes a request body may have (``max_request_bytes``, "auto" resolved)."""
        if self.max_request_bytes != "auto":
            return self.max_request_bytes
        return -(-self.max_images * self.max_image_bytes * 4 // 3) + 1024 * 1024


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Server processes (service/api/workers.py), each with its own models and indexes, each sizing its
    # model threads by its share of the cores (ModelSettings.for_cores). On 2 cores, two served 0.80-0.86
    # of the raw model rate at 32-64 concurrent requests against 0.71-0.83 for one (whose cores idle while
    # the GIL passes between its threads); at 8, one was as fast and served cached photos faster
    # (docs/performance.md, session 39).
    workers: int = Field(default=1, ge=1, le=64)
    # Threads scoring queued requests together (see service.usecases.score_queue). One: the models start
    # on a request's photos as it is queued (prefetch_embeddings), so a second thread only matched and
    # stored beside the first, in the same GIL, and halved the batches that share a transaction.
    # bench A/B on 2 cores (session 35): 134.6 against 130.9 listings/s at c=8, 13.2 against 13.8 ms of
    # server CPU a listing; 59.2 against 57.2 with every listing verified by keypoints.
    scoring_threads: int = Field(default=1, ge=1, le=64)
    # Threads finishing the listings that the cascade sends on to an expensive signal (keypoints, logo
    # templates, OCR), so that the rest of their batch is answered without waiting for them.
    slow_scoring_threads: int = Field(default=2, ge=1, le=64)
    # Listings that may wait for a free slow thread. Beyond them the scoring threads take no new requests
    # until one is finished: the older listings are answered first, with the cores to themselves, and an
    # overload queues requests rather than expensive work. bench_score, every listing verified, c=8:
    # 0 waiting gave p99 221-236 ms and 32 ms of server CPU a listing; unbounded 282-296 ms and 35 ms.
    slow_waiting_listings: int = Field(default=0, ge=0, le=4096)
    max_batch_listings: int = Field(default=32, ge=1, le=1024)
    # Start the models on a request's new photos as it is queued rather than when a scoring thread takes
    # its batch (service.usecases.embedding): bench_score c=8, ~3 % more listings/s.
    prefetch_embeddings: bool = True
    # Listings that may wait in the scoring queue (service.usecases.score_queue); a request beyond them is
    # refused at once with 503 and a Retry-After. 1,024 is ~8 s of the cheap path on 2 cores: a caller
    # is better off retrying later than waiting longer than that.
    max_waiting_listings: int = Field(default=1024, ge=1, le=1_000_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds between checks for catalog changes made by other processes (other workers, a CLI import),
    # which are then patched into this worker's indexes (service.usecases.catalog_watch); 0: never.
    catalog_sync_s: float = Field(default=2.0, ge=0, le=3600)
    # Where the stored rescans that catalog changes start run (service.rescan_process): "process", one
    # child process per worker at a lower CPU priority (nice, 0-19); "thread", a thread of the worker
    # itself, whose requests then wait for it (the GIL).
    background_rescans: Literal["process", "thread"] = "process"
    background_rescan_nice: int = Field(default=10, ge=0, le=19)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COUNTERLENS_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    storage: StorageSettings = StorageSettings()
    models: ModelSettings = ModelSettings()
    index: IndexSettings = IndexSettings()
    scoring: ScoringSettings = ScoringSettings()
    keypoints: KeypointSettings = KeypointSettings()
    logo_templates: LogoTemplateSettings = LogoTemplateSettings()
    intake: IntakeSettings = IntakeSettings()
    server: ServerSettings = ServerSettings()

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'counterlens.sqlite3'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"
