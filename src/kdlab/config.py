"""Typed run configuration: YAML recipes + ``key.sub=value`` overrides, validated by pydantic.

One :class:`RunConfig` describes a whole run. It is built from a YAML file, then command-line overrides are applied
to the raw mapping, then the result is validated as a whole. Every error is a single line naming the offending key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.errors import ConfigError, did_you_mean
from kdlab.trust import distrust_folder, names_code, names_folder


_VAR = re.compile(r"\$\{(\w+)(:-[^}]*)?\}|\$(\w+)")


class UnsetVariableError(ConfigError, ValueError):
    """A path names an environment variable that is not set (a ``ValueError`` too, so pydantic adds the key)."""


def expand_path(value: str) -> str:
    """Expand ``~``, ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` in a path; an unset variable without a default is
    an error naming it (never silently the empty string)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        found = os.environ.get(name)
        if found:
            return found
        if m.group(2) is not None:
            return m.group(2)[2:]
        if found is None:
            raise UnsetVariableError(f"environment variable {name} is not set (in the path '{value}')")
        return found

    return os.path.expanduser(_VAR.sub(sub, value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Which dataset and how to read it."""

    name: str = Field(
        "mnist1d",
        description="dataset: mnist1d | cifar100 | cifar10 | synthetic | imagefolder | imagenet | webdataset, or a "
        "user builder "
        "package.module:function / path/to/file.py:function (needs --trust-code; kdlab.trust)",
        json_schema_extra=names_code("builder"),
    )
    root: str | None = Field(
        None,
        description="CIFAR: folder with train.npz/test.npz, an official cifar-*-python folder or its .tar.gz; "
        "MNIST-1D: cache folder (default: $KDLAB_CACHE or ~/.cache/kdlab); imagefolder/imagenet: folder holding "
        "train/<class>/… and val/<class>/…; webdataset: the export folder (dataset.json, train-*.tar, val-*.tar)",
        json_schema_extra=names_folder("data folder"),
    )
    num_samples: int = Field(5000, gt=0, description="MNIST-1D / synthetic: total samples (train + test)")
    train_split: float = Field(0.8, gt=0, lt=1, description="MNIST-1D / synthetic: fraction used for training")
    augment: bool = Field(True, description="standard augmentation (CIFAR: random crop 32 pad 4 + flip)")
    shift: int = Field(0, ge=0, description="MNIST-1D: random translation of up to ±shift samples (0 = off)")
    strong_augment: Literal["randaugment", "jitter_cutout"] = Field(
        "randaugment", description="images: strong view of two-view methods (MLKD): randaugment = the MLKD release's "
        "RandAugment(2, 10) + Cutout, jitter_cutout = kdlab's earlier stand-in",
    )  # fmt: skip
    augment_seed: int | None = Field(
        None, ge=0, description="seed of the augmentation stream (default: the run seed; a teacher cache fixes it)"
    )
    num_classes: int = Field(100, gt=1, description="synthetic: number of classes")
    label_noise: float = Field(0.0, ge=0, lt=1, description="fraction of training labels flipped to another class")
    label_noise_seed: int = Field(0, ge=0, description="seed choosing which labels flip and to what")
    workers: int = Field(2, ge=0, description="streamed data: DataLoader worker processes decoding images (0 = main)")
    prefetch: int = Field(2, ge=1, description="streamed data: batches prefetched per worker")
    image_size: int | None = Field(
        None, gt=0, description="streamed images: crop size (default: the transform's, imagenet 224, cifar 32)"
    )
    transform: str | None = Field(
        None, description="streamed images: imagenet (RandomResizedCrop + flip; resize + center crop) | cifar "
        "(pad-4 random crop + flip at image_size); default: the dataset's own (imagenet, or the transform a "
        "WebDataset export records: cifar for CIFAR)",
    )  # fmt: skip
    mean: tuple[float, float, float] | None = Field(None, description="streamed images: channel means")
    std: tuple[float, float, float] | None = Field(None, description="streamed images: channel stds")
    skip_bad_images: bool = Field(False, description="streamed data (imagefolder, webdataset, a user Dataset): skip "
                                  "and count unreadable or invalid samples (corrupt, truncated, too large, not a regular "
                                  "file, wrong shape, non-finite), do not stop")
    decoder: str = Field("auto", description="streamed images: auto (simplejpeg when installed, else pillow) | "
                         "pillow | simplejpeg; the same pixels, a speed choice only (kdlab.data.decode)")
    reduced_decode: bool = Field(True, description="streamed images: decode a JPEG at the largest DCT reduction "
                                 "(1/2, 1/4, 1/8) leaving the crop at least the output size; false: full size")
    max_image_pixels: int = Field(1 << 28, gt=0, description="streamed images: an image declaring more pixels, "
                                  "or a resize producing more, is refused (skipped with skip_bad_images)")
    urls: dict[str, str | list[str]] | None = Field(
        None, description="webdataset: shards per split, {train: URLS, val: URLS}: paths, brace patterns "
        "(train-{000000..000099}.tar), http(s):// (curl), pipe:COMMAND (needs --trust-code); the export's "
        "dataset.json is read from data.root, else from beside the first train shard",
    )  # fmt: skip
    shuffle_buffer: int = Field(1000, ge=1, description="webdataset: samples in each worker's seeded shuffle "
                                "buffer (held encoded)")
    max_train_samples: int | None = Field(None, gt=0, description="use only the first N training samples")
    max_test_samples: int | None = Field(None, gt=0, description="use only the first N test samples")
    val_split: float = Field(
        0.0, ge=0, description="hold out part of the training set as the val split, evaluated every epoch: a "
        "fraction (0 < v < 1) or a whole number of samples (v >= 1); 0 = none (kdlab.data.holdout)",
    )  # fmt: skip
    val_seed: int = Field(0, ge=0, description="seed choosing which training samples the val split holds "
                          "(independent of the run seed: every seed and every tuning trial sees the same split)")
    read_test: bool = Field(True, description="false: the test split is never read (kdlab tune's trials); each "
                            "epoch is evaluated, and the best epoch chosen, on the val split (needs data.val_split)")

    @field_validator("val_split")
    @classmethod
    def _val_split(cls, v: float) -> float:
        if v >= 1 and not float(v).is_integer():
            raise ValueError("must be a fraction below 1 or a whole number of samples")
        return v

    @model_validator(mode="after")
    def _test_or_val(self) -> DataConfig:
        if not self.read_test and not self.val_split:
            raise ValueError(_QUALIFIED + "data.read_test=false needs a val split to evaluate on: set data.val_split (e.g. 0.1)")
        return self

    @field_validator("name")
    @classmethod
    def _trusted(cls, v: str) -> str:
        """A builder named by import path is checked for trust here (:mod:`kdlab.trust`); registry names are
        resolved by kdlab.data when the data is built (config does not import data)."""
        from kdlab.trust import is_import_path, resolve_code

        if is_import_path(v):
            resolve_code(v, what="data.name", kind="builder")
        return v

    @field_validator("root")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else expand_path(v)


class ModelConfig(_Strict):
    """A network of the model registry, or a user's ``nn.Module`` seen through forward hooks."""

    name: str = Field(
        ...,
        description="architecture in kdlab.models (e.g. resnet8, mnist1d_mlp), or a user model "
        "package.module:Class / path/to/file.py:Class (code trust: kdlab.trust)",
        json_schema_extra=names_code("model"),
    )
    classifier: str | None = Field(None, description="user model: module path of the final nn.Linear (e.g. fc)")
    features: str | list[str] | None = Field(
        None, description="user model: module whose output is the pre-pool feature map (e.g. layer4), or a list of "
        "stage modules, last = pre-pool map (e.g. [layer1, layer2, layer3, layer4]); default: the classifier's input",
    )  # fmt: skip
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments of the model")

    code_key: ClassVar[str] = "model.name"  # the key named in messages about the code in ``name``

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdlab.models import MODELS
        from kdlab.models.taps import is_user_model, resolve_user_class

        if is_user_model(v):
            resolve_user_class(v, what=cls.code_key)  # trusted and importable, with a one-line error otherwise
        else:
            MODELS.get(v)  # raises a one-line error with a suggestion
        return v

    @model_validator(mode="after")
    def _taps_for_user_models(self) -> ModelConfig:
        from kdlab.models.taps import is_user_model

        if is_user_model(self.name):
            if not self.classifier:
                raise ValueError(f"classifier is required for the user model '{self.name}' (its final nn.Linear)")
        elif self.classifier is not None or self.features is not None:
            raise ValueError(f"classifier / features name the taps of user models; '{self.name}' is a kdlab model")
        return self


class TeacherMember(ModelConfig):
    """One extra member of an ensemble teacher."""

    checkpoint: str = Field(..., description="weights: a .safetensors file, a kdlab run directory or a PyTorch .pth "
                            "state dict (read weights-only, e.g. torchvision's resnet34-b627a593.pth)",
                            json_schema_extra=names_folder("teacher's folder"))  # fmt: skip
    code_key: ClassVar[str] = "teacher.ensemble[].name"

    @field_validator("checkpoint")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)


class TeacherConfig(ModelConfig):
    """The frozen teacher of a distillation run."""

    checkpoint: str = Field(..., description="teacher weights: a .safetensors file, a kdlab run directory or a PyTorch "
                            ".pth state dict (read weights-only, e.g. torchvision's resnet34-b627a593.pth)",
                            json_schema_extra=names_folder("teacher's folder"))  # fmt: skip
    ensemble: list[TeacherMember] = Field(
        default_factory=list, description="more teachers [{name, checkpoint}]: logits averaged with the main one"
    )
    cache: str | None = Field(None, description="teacher-output cache from `kdlab cache-teacher` (replayed, no teacher forward)",
                              json_schema_extra=names_folder("teacher cache's folder"))  # fmt: skip
    fold_bn: bool = Field(True, description="run the frozen teacher with each BatchNorm folded into the convolution "
                          "feeding it when nothing else reads that convolution's output (same outputs to float rounding, "
                          "one pass less over each map); false: the teacher runs as stored")
    code_key: ClassVar[str] = "teacher.name"

    @field_validator("checkpoint", "cache")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else expand_path(v)


class MethodConfig(BaseModel):
    """Loss recipe: ``name`` picks a class in ``kdlab.methods``; the other keys are that method's parameters."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("ce", description="method name in kdlab.methods (ce, kd, mse, ...)")

    @model_validator(mode="after")
    def _validate_params(self) -> MethodConfig:
        from kdlab.methods import METHODS

        cls = METHODS.get(self.name)
        extra = dict(self.model_extra or {})
        try:
            params = cls.Params(**extra)
        except ValidationError as err:
            raise ValueError(_QUALIFIED + _first_error(err, prefix="method", model=cls.Params)) from None
        weights = {k: v for k, v in params.model_dump().items() if k.endswith("_weight")}
        if weights and not any(weights.values()):
            raise ValueError(_QUALIFIED + f"method.{'/'.join(weights)}: all loss weights are zero, nothing would train")
        for key, value in params.model_dump().items():
            setattr(self, key, value)
        return self

    def params(self) -> dict[str, Any]:
        """The method's validated parameters (everything except ``name``)."""
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    """The optimizer (kdlab.engine.optim): SGD with momentum, Adam or AdamW, with optional weight-decay exemptions."""

    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="sgd | adam | adamw")
    lr: float = Field(0.05, gt=0, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only)")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only)")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty (sgd, adam) or decoupled decay (adamw)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw: (β1, β2)")
    eps: float = Field(1e-8, gt=0, description="adam/adamw: denominator epsilon")
    no_decay_norm: bool = Field(False, description="no weight decay on normalisation layers (BatchNorm etc.)")
    no_decay_bias: bool = Field(False, description="no weight decay on biases")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v


class ScheduleConfig(_Strict):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210], description="multistep: epochs to decay at")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: decay factor")
    min_lr: float = Field(0.0, ge=0, description="cosine: final learning rate")
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up epochs before the schedule")

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be positive and increasing")
        return v


class TrainConfig(_Strict):
    """The training loop."""

    epochs: int = Field(240, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice)")
    progress: bool = Field(True, description="tqdm progress bars")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower on CUDA)")
    keep_checkpoints: int = Field(2, ge=1, description="how many epoch checkpoints to keep")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="autocast precision; auto = bf16 on CUDA, none (float32) elsewhere")
    channels_last: bool | None = Field(None, description="NHWC memory format for image models (default: on CUDA and CPU)")
    compile: bool = Field(False, description="torch.compile the student step and the teacher forward")
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "auto", description="torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA, default elsewhere")
    drop_last: bool = Field(False, description="drop the partial last training batch (static shapes under compile)")
    sync_bn: bool = Field(False, description="torchrun: BatchNorm statistics over the global batch, not per process")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_none(cls, v: object) -> object:
        return "none" if v is None else v  # `train.amp=none` arrives as None from the override parser

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{v}'")
        return v


class WandbConfig(_Strict):
    """Weights & Biases run mirroring metrics.jsonl (needs ``pip install 'kdlab[trackers]'``)."""

    project: str = Field(..., min_length=1, description="wandb project")
    mode: Literal["offline", "online"] = Field("offline", description="offline writes to RUN/wandb/; online uploads")
    entity: str | None = Field(None, description="wandb team or user (default: yours)")


class MlflowConfig(_Strict):
    """MLflow run mirroring metrics.jsonl (needs ``pip install 'kdlab[trackers]'``)."""

    tracking_uri: str = Field(..., min_length=1, description="e.g. file:./mlruns, sqlite:///mlflow.db, http://host:5000")
    experiment: str = Field("kdlab", min_length=1, description="MLflow experiment name")


class LoggingConfig(_Strict):
    """Experiment trackers: each receives every row of metrics.jsonl (rank 0 only; kdlab.engine.trackers)."""

    tensorboard: bool = Field(False, description="write TensorBoard event files to RUN/tensorboard/")
    wandb: WandbConfig | None = Field(None, description="{project, mode: offline|online, entity}")
    mlflow: MlflowConfig | None = Field(None, description="{tracking_uri, experiment}")


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(value: int | str) -> int:
    """A Slurm time limit in whole minutes (rounded up): ``90``, ``"90"``, ``"MM:SS"``, ``"HH:MM:SS"``, ``"D-HH"``,
    ``"D-HH:MM"``, ``"D-HH:MM:SS"`` (sbatch's formats)."""
    if isinstance(value, bool):
        raise ValueError(f"time must be minutes or a Slurm time such as 4:00:00 or 1-12:00:00, got {value!r}")
    if isinstance(value, int):
        parts: tuple[int, int, int, int] = (0, 0, value, 0)
    else:
        m = _SLURM_TIME.match(str(value).strip())
        if not m:
            raise ValueError(f"time must be minutes or a Slurm time such as 4:00:00 or 1-12:00:00, got '{value}'")
        days, a, b, c = (None if g is None else int(g) for g in m.groups())
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            parts = (days, a or 0, b or 0, c or 0)
        elif c is not None:  # HH:MM:SS
            parts = (0, a or 0, b or 0, c)
        elif b is not None:  # MM:SS
            parts = (0, 0, a or 0, b)
        else:  # minutes
            parts = (0, 0, a or 0, 0)
    d, h, mi, s = parts
    seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {value!r}")
    return -(-seconds // 60)


class LauncherConfig(_Strict):
    """Where runs execute (``--launcher``, :mod:`kdlab.launch`): here / local worker processes, or Slurm jobs
    (submitit). The run's results do not depend on it; a resume may change it."""

    name: str = Field("local", min_length=1, description="local (this machine, --jobs workers) | slurm")
    partition: str | None = Field(None, description="slurm: partition (default: the cluster's)")
    time: int | str | None = Field(None, description="slurm: time limit per job (minutes, HH:MM:SS, D-HH:MM:SS)")
    nodes: int = Field(1, ge=1, description="slurm: nodes per run (one process per GPU, or per task on CPU)")
    gpus_per_node: int = Field(0, ge=0, description="slurm: GPUs per node")
    tasks_per_node: int | None = Field(None, ge=1, description="slurm: processes per node (default: gpus_per_node or 1)")
    cpus_per_task: int | None = Field(None, ge=1, description="slurm: CPU cores per process")
    mem_gb: float | None = Field(None, gt=0, description="slurm: memory per node (GB)")
    account: str | None = Field(None, description="slurm: account to charge")
    qos: str | None = Field(None, description="slurm: quality of service")
    constraint: str | None = Field(None, description="slurm: node features, e.g. a100")
    array_parallelism: int = Field(256, ge=1, description="slurm: tasks of a job array running at once")
    setup: list[str] = Field(default_factory=list, description="slurm: shell lines run first (module load, venv)")
    additional: dict[str, Any] = Field(default_factory=dict, description="slurm: raw sbatch options {name: value}")
    signal_delay_s: int = Field(120, ge=10, description="slurm: checkpoint-and-requeue signal this long before the limit")
    max_timeouts: int = Field(20, ge=0, description="slurm: requeues after hitting the time limit, at most")
    python: str | None = Field(None, description="slurm: python on the nodes (default: this interpreter)")

    @field_validator("time")
    @classmethod
    def _time(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            slurm_minutes(v)
        return v

    @model_validator(mode="after")
    def _one_line_values(self) -> LauncherConfig:
        """Every value lands on an ``#SBATCH`` line: a line break would smuggle a shell line into the job script."""
        values = [(k, v) for k, v in self if k != "setup" and isinstance(v, str)]
        values += [(f"additional.{k}", f"{k} {v}") for k, v in self.additional.items()]
        values += [(f"setup[{i}]", v) for i, v in enumerate(self.setup)]
        for key, text in values:
            if any(c in str(text) for c in "\n\r\0"):
                raise ValueError(f"launcher.{key} must be one line (no line breaks or NUL characters)")
        return self

    @property
    def time_minutes(self) -> int | None:
        return None if self.time is None else slurm_minutes(self.time)

    @property
    def requeue_signal_s(self) -> int:
        """The signal delay asked of Slurm: ``signal_delay_s``, at most a third of the time limit. Slurm sends the
        signal up to 30 s before it is due, so a delay as long as a short limit (the default 120 s with ``time=1``)
        would stop every attempt before its first epoch: requeues without progress until ``max_timeouts``."""
        t = self.time_minutes
        return self.signal_delay_s if t is None else min(self.signal_delay_s, t * 60 // 3)


class RunConfig(_Strict):
    """Everything a ``kdlab train`` or ``kdlab distill`` run needs."""

    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    teacher: TeacherConfig | None = None
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    instruments: list[str] = Field(
        default_factory=list, description="per-epoch measurements recorded into metrics.jsonl (kdlab.engine.callbacks)"
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    meta: dict[str, Any] = Field(default_factory=dict, description="free-form notes (paper numbers, tags)")

    @model_validator(mode="before")
    @classmethod
    def _code_trust(cls, raw: Any) -> Any:
        """Every key naming code is decided before anything named is imported (:func:`kdlab.trust.vet_config`)."""
        from kdlab.trust import vet_config

        vet_config(raw, cls)
        return raw

    @field_validator("instruments")
    @classmethod
    def _known_instruments(cls, v: list[str]) -> list[str]:
        from kdlab.engine.callbacks import CALLBACKS

        for name in v:
            CALLBACKS.get(name)
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------------------------
# loading, overrides, error messages


_QUALIFIED = "\u2063"  # invisible marker: the message already names its full key


def _first_error(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    key = ".".join(([prefix] if prefix else []) + loc)
    if e["type"] == "extra_forbidden":
        parent = key[: -len(loc[-1])]
        choices = [parent + c for c in _fields_at(model or RunConfig, loc[:-1])]
        return f"unknown key '{key}'{did_you_mean(key, choices)}"
    if e["type"] == "missing":
        return f"missing required key '{key}'"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if msg.startswith(_QUALIFIED):  # nested method-parameter error, already formatted with its full key
        return msg[len(_QUALIFIED) :]
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None or f"'{got}'" in msg else f" (got {got!r})"
    return f"{key}: {msg}{shown}" if key else f"{msg}{shown}"


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the nested model at ``loc`` (best effort, for suggestions)."""
    cur: Any = model
    for part in loc:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        cur = next((a for a in (args or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))


def yacs_hint(tokens: list[str]) -> str:
    """``; write train.epochs=3`` when ``tokens`` hold a ``key value`` pair (the yacs habit), else ``""``."""
    for key, value in zip(tokens, tokens[1:]):
        if "=" not in key and "=" not in value and "." in key and not key.startswith("-") and not value.startswith("-"):
            return f"; write {key}={value} (key=value, one word)"
    return ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``4`` → int, ``[1,2]`` → list, ``none`` → None)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return parts, value


def set_dotted(raw: dict[str, Any], parts: list[str] | tuple[str, ...], value: Any, where: str) -> None:
    """Set ``raw[a][b]...[z] = value`` for ``parts = (a, b, ..., z)``, creating sections; ``where`` names the source
    in the error raised when a path goes through a value that is not a section."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw mapping (unknown keys are caught later by validation)."""
    for i, text in enumerate(overrides):
        if "=" not in text:
            raise ConfigError(f"override '{text}' must look like key.sub=value{yacs_hint(overrides[i:])}")
        parts, value = parse_override(text)
        set_dotted(raw, parts, value, f"override '{text}'")
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unset(raw: dict[str, Any], keys: Any, path: Path) -> None:
    """Remove the dotted ``keys`` (a recipe's ``unset: [a.b, c]``) from the inherited mapping ``raw``."""
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{path}: 'unset' must be a list of dotted keys, e.g. unset: [method.ce_weight]")
    for key in keys:
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{path}: unset: '{key}' is not set by its base recipe")
        del node[parts[-1]]


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; a top-level ``base: other.yaml`` (relative to the file) is loaded first and deep-merged.

    A child removes inherited keys with a top-level ``unset: [dotted.key, ...]``, applied to the base before the
    child's own keys are merged (``unset: [method]`` + a new ``method:`` section replaces the section whole).
    """
    path = Path(path)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    unset = raw.pop("unset", None)
    if base is None:
        if unset is not None:
            raise ConfigError(f"{path}: 'unset' removes keys inherited from a 'base' recipe, and this one has none")
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name")
    base_path = path.parent / base  # read (and named in errors) as written; compared resolved for loops
    if base_path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path.resolve()}")
    inherited = read_recipe(base_path, _seen + (path.resolve(),))
    if unset is not None:
        _unset(inherited, unset, path)
    return _deep_merge(inherited, raw)


MAX_YAML_NODES = 100_000  # after alias expansion; recipes have a few hundred


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], path: Path) -> int:
    """Number of nodes ``node`` stands for once every alias is expanded (what validation would walk)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise ConfigError(f"{path}: a YAML alias refers to its own anchor (a recursive structure)")
        return memo[key]
    memo[key] = -1
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, path)
        if total > MAX_YAML_NODES:
            break
    memo[key] = total
    return total


def _load_yaml_text(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that refuses an alias bomb (a few anchors expanding to gigabytes) before building it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, path) > MAX_YAML_NODES:
            raise ConfigError(f"{path}: YAML expands to more than {MAX_YAML_NODES} nodes through aliases (&/*)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with one-line errors for missing files, folders/FIFOs, malformed YAML and alias bombs."""
    from kdlab.fileio import read_text

    path = Path(path)
    text = read_text(path, "config", "config file", ConfigError)  # a regular file within KDLAB_MAX_BYTES_CONFIG
    distrust_folder(path, "config's folder")  # code beside a config never counts as installed (kdlab.trust)
    try:
        raw = _load_yaml_text(text, path)
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def validate(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig` (one-line :class:`ConfigError` on failure)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_first_error(err)}") from None
    except ConfigError:
        raise


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Load a YAML recipe (or start from ``base``), apply overrides and validate."""
    raw = read_recipe(path) if path is not None else dict(base or {})
    return validate(apply_overrides(raw, list(overrides or []) + smoke_overrides()))


#: ``KDLAB_SMOKE=1`` shrinks every run to one epoch on a slice of the data (the README test runs the README this way)
SMOKE_ENV = "KDLAB_SMOKE"


def smoke_overrides() -> list[str]:
    """The overrides of smoke mode (empty unless ``$KDLAB_SMOKE`` is set to a non-empty value other than 0)."""
    if os.environ.get(SMOKE_ENV, "") in ("", "0"):
        return []
    return ["train.epochs=1", "data.max_train_samples=1000", "data.max_test_samples=500"]


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a crash leaves the old file or the new one, never half)."""
    from kdlab.engine.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
