"""Any ``nn.Module`` through kdlab's model interface, by forward hooks (no editing of ``forward``).

The user names two modules by their path in ``named_modules()``:

* ``classifier`` — the final ``nn.Linear``. A forward hook records its input (the pooled penultimate vector) and its
  output (the logits), so the logits are exactly what the model computes, whatever its ``forward`` returns.
* ``features`` (optional) — the module whose output is the pre-pool feature map (e.g. ``layer4``): N×C×H×W,
  N×C×L or a vector; or a list of modules, the model's *stages* (``[layer1, layer2, layer3, layer4]``): their
  outputs become ``ModelOutput.stages`` (and ``preacts``: name BatchNorm modules to tap pre-activations; a list
  of BatchNorms also gives OFD its margins), the last one is the pre-pool map. Without it, the classifier's input is
  both the "pre-pool" and the pooled feature (vector features, as for an MLP), and the model has no stages.

Feature maps must be channels-first. A 3-D output that looks like tokens (N×T×C: the module is a Linear /
LayerNorm / attention / transformer layer, or its last dimension is the classifier's width) is flagged by
:meth:`TappedModel.token_shaped` so that feature methods can refuse it with a clear message.

:class:`TappedModel` holds the user's model as ``self.model`` but its ``state_dict()`` / ``load_state_dict()`` use
the user's own key names (no ``model.`` prefix), so checkpoints written for the plain module load unchanged and
kdlab's weights files load into the plain module. In a config the model is named by an import path::

    model:
      name: mypkg.nets:MyNet              # or a file: path/to/file.py:MyNet (relative to the working directory)
      classifier: fc
      features: layer4                    # or stages: [layer1, layer2, layer3, layer4]
      kwargs: {width: 32}                 # constructor arguments; num_classes is passed when the constructor takes it
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from torch import nn

from kdlab.errors import ConfigError, did_you_mean
from kdlab.models.base import HEAD, HeadMixin, ModelOutput
from kdlab.trust import resolve_code

_WRAPPED = "model."


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class TappedModel(HeadMixin, nn.Module):
    """Wrap ``model`` so that ``forward_features(x)`` returns a :class:`ModelOutput` collected by forward hooks."""

    def __init__(self, model: nn.Module, classifier: str, features: str | list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.classifier_name = classifier
        paths = [features] if isinstance(features, str) else list(features or [])
        if features is not None and not paths:
            raise ConfigError("model.features: the list of stage modules is empty")
        self.feature_paths: tuple[str, ...] = tuple(paths)
        self.features_name = paths[-1] if paths else None  # the pre-pool map
        modules = dict(model.named_modules())
        for role, path in [("classifier", classifier)] + [("features", p) for p in paths]:
            if path is not None and (path == "" or path not in modules):
                names = [n for n in modules if n]
                raise ConfigError(
                    f"model.{role}: '{path}' is not a module of {type(model).__name__}{did_you_mean(path, names)}"
                    f"; modules: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
                )
        if not isinstance(modules[classifier], nn.Linear):
            raise ConfigError(
                f"model.classifier: '{classifier}' is a {type(modules[classifier]).__name__}, not the final nn.Linear"
            )
        self._taps: dict[str, torch.Tensor] = {}
        modules[classifier].register_forward_hook(self._classifier_hook)
        for i, path in enumerate(paths):
            modules[path].register_forward_hook(partial(self._features_hook, i))
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    # hooks -----------------------------------------------------------------------------------------------------------

    def _classifier_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._taps["pooled"] = args[0]
        self._taps["logits"] = output

    def _features_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is None:
            raise ConfigError(f"model.features: '{self.feature_paths[i]}' returned {type(output).__name__}, not a tensor")
        self._taps[f"stage{i}"] = tensor  # a module run twice: its last output counts

    # interface -------------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        """Run the user's ``forward`` once and return what the hooks saw (through the head, when one is attached)."""
        self._taps = {}
        try:
            self.model(x)
            taps = self._taps
        finally:
            self._taps = {}
        if "logits" not in taps:
            raise ConfigError(f"model.classifier: '{self.classifier_name}' did not run during forward")
        pooled = taps["pooled"]
        stages = []
        for i, path in enumerate(self.feature_paths):
            if f"stage{i}" not in taps:
                raise ConfigError(f"model.features: '{path}' did not run during forward")
            stages.append(taps[f"stage{i}"])
        prepool = stages[-1] if stages else pooled
        return self._through_head(ModelOutput(taps["logits"], prepool, pooled, tuple(stages), tuple(stages)))

    def stage_norms(self) -> list[nn.Module]:
        """The tapped stage modules when they are all BatchNorms (their outputs are then pre-activations)."""
        modules = [self.model.get_submodule(p) for p in self.feature_paths]
        if not modules or not all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
            raise ConfigError(
                "OFD needs the teacher's BatchNorm before each stage ReLU: name BatchNorm modules in teacher.features"
            )
        return modules

    _TOKEN_MODULES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                      nn.TransformerEncoder, nn.TransformerDecoderLayer)  # fmt: skip

    def token_shaped(self, out: ModelOutput) -> str | None:
        """The path of the first tapped stage whose output looks like N×T×C tokens, or ``None``."""
        width = self.own_classifier.in_features
        for path, t in zip(self.feature_paths, out.stages):
            module = self.model.get_submodule(path)
            if t.dim() == 3 and (isinstance(module, self._TOKEN_MODULES) or (t.shape[-1] == width != t.shape[1])):
                return path
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: the user's own forward, or the head's prediction when one is attached."""
        if self.head is None:
            return self.model(x)
        return self.forward_features(x).logits

    @property
    def own_classifier(self) -> nn.Linear:
        """The user's final ``nn.Linear`` (at ``classifier``), whether or not a head is attached."""
        module = self.model.get_submodule(self.classifier_name)
        assert isinstance(module, nn.Linear)
        return module

    @property
    def classifier(self) -> nn.Linear:
        """The final linear classifier: the head's reused classifier when a head is attached."""
        head = self.head
        return head.classifier if head is not None else self.own_classifier


def _strip_prefix(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: ``<prefix>model.<key>`` → ``<prefix><key>`` (order kept)."""
    ours = [k for k in state if k.startswith(prefix)]
    items = [(k, state.pop(k)) for k in ours]
    inner = prefix + _WRAPPED
    for k, v in items:
        state[prefix + k[len(inner) :] if k.startswith(inner) else k] = v


def _add_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: ``<prefix><key>`` → ``<prefix>model.<key>`` except for the head's keys."""
    keep = (prefix + _WRAPPED, prefix + HEAD + ".")
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(keep)]:
        state[prefix + _WRAPPED + k[len(prefix) :]] = state.pop(k)


# ---------------------------------------------------------------------------------------------------------------------
# user models named by import path


def is_user_model(name: str) -> bool:
    """``module.path:Class`` or ``path/to/file.py:Class`` (kdlab's own model names contain no colon)."""
    return ":" in name


def resolve_user_class(name: str, what: str = "model.name") -> type[nn.Module]:
    """The ``nn.Module`` class named by ``module.path:Class`` (an installed module) or ``file.py:Class`` (only with
    ``--trust-code``); any other callable (a factory) only with ``--trust-code`` (:mod:`kdlab.trust`, ``what`` names
    the key). Nothing is called here; one-line :class:`ConfigError` otherwise."""
    return resolve_code(name, what=what, kind="model")  # type: ignore[no-any-return]


def build_user_model(
    name: str, num_classes: int, classifier: str | None, features: str | list[str] | None = None, **kwargs: Any
) -> TappedModel:
    """Instantiate the user's model and wrap it in a :class:`TappedModel`.

    ``num_classes`` is passed to the constructor when it accepts such a parameter; otherwise the classifier's
    ``out_features`` must equal it.
    """
    if not classifier:
        raise ConfigError(f"model.classifier is required for the user model '{name}' (the final nn.Linear's path)")
    cls = resolve_user_class(name)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("num_classes", num_classes)
    try:
        model = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs do not fit {name}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"user model '{name}' returned {type(model).__name__}, not an nn.Module")
    tapped = TappedModel(model, classifier, features)
    out = tapped.classifier.out_features
    if out != num_classes:
        raise ConfigError(f"model '{name}': classifier '{classifier}' has {out} outputs but the data has {num_classes}")
    return tapped
