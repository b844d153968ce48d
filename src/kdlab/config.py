"""Typed run configuration: YAML recipes + ``key.sub=value`` overrides, validated by pydantic.

One :class:`RunConfig` describes a whole run. It is built from a YAML file, then command-line overrides are applied
to the raw mapping, then the result is validated as a whole. Every error is a single line naming the offending key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.errors import ConfigError, did_you_mean


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """Expand ``~``, ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` in a path."""
    value = _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    return os.path.expanduser(os.path.expandvars(value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Which dataset and how to read it."""

    name: str = Field("mnist1d", description="dataset: mnist1d | cifar100 | cifar10 | synthetic")
    root: str | None = Field(
        None,
        description="CIFAR: folder with train.npz/test.npz, an official cifar-*-python folder or its .tar.gz; "
        "MNIST-1D: cache folder (default: $KDLAB_CACHE or ~/.cache/kdlab)",
    )
    num_samples: int = Field(5000, gt=0, description="MNIST-1D / synthetic: total samples (train + test)")
    train_split: float = Field(0.8, gt=0, lt=1, description="MNIST-1D / synthetic: fraction used for training")
    augment: bool = Field(True, description="standard augmentation (CIFAR: random crop 32 pad 4 + flip)")
    shift: int = Field(0, ge=0, description="MNIST-1D: random translation of up to ±shift samples (0 = off)")
    augment_seed: int | None = Field(
        None, ge=0, description="seed of the augmentation stream (default: the run seed; a teacher cache fixes it)"
    )
    num_classes: int = Field(100, gt=1, description="synthetic: number of classes")
    label_noise: float = Field(0.0, ge=0, lt=1, description="fraction of training labels flipped to another class")
    label_noise_seed: int = Field(0, ge=0, description="seed choosing which labels flip and to what")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdlab.data import DATASETS

        DATASETS.get(v)
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
        "package.module:Class / path/to/file.py:Class",
    )
    classifier: str | None = Field(None, description="user model: module path of the final nn.Linear (e.g. fc)")
    features: str | None = Field(
        None, description="user model: module whose output is the pre-pool feature map (e.g. layer4); "
        "default: the classifier's input (vector features)",
    )  # fmt: skip
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments of the model")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdlab.models import MODELS
        from kdlab.models.taps import is_user_model, resolve_user_class

        if is_user_model(v):
            resolve_user_class(v)  # importable, with a one-line error otherwise
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

    checkpoint: str = Field(..., description="weights: a .safetensors file or a kdlab run directory")

    @field_validator("checkpoint")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)


class TeacherConfig(ModelConfig):
    """The frozen teacher of a distillation run."""

    checkpoint: str = Field(..., description="teacher weights: a .safetensors file or a kdlab run directory")
    ensemble: list[TeacherMember] = Field(
        default_factory=list, description="more teachers [{name, checkpoint}]: logits averaged with the main one"
    )
    cache: str | None = Field(None, description="teacher-output cache from `kdlab cache-teacher` (replayed, no teacher forward)")

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
    """SGD with momentum."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.05, gt=0, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)


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
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast precision on CUDA (bf16 recommended)")
    channels_last: bool | None = Field(None, description="NHWC memory format for image models (default: on CUDA only)")
    compile: bool = Field(False, description="torch.compile the student step and the teacher forward")

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
    meta: dict[str, Any] = Field(default_factory=dict, description="free-form notes (paper numbers, tags)")

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
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
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
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(raw, parts, value, f"override '{text}'")
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; a top-level ``base: other.yaml`` (relative to the file) is loaded first and deep-merged."""
    path = Path(path)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return _deep_merge(read_recipe(base_path, _seen + (path.resolve(),)), raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with one-line errors for missing files and malformed YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
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
    return validate(apply_overrides(raw, list(overrides or [])))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
