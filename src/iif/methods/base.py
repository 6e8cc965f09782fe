"""What every attribution method shares: the task and training data, the engine's parts bound
to one trained model, and ensembles over several models.

A method subclasses :class:`AttributionMethod` and implements, for the single model it is bound
to (``self.engine``: an :class:`iif.engine.engine.Engine` of that model at its theta*):

- ``_attribute(test) -> Attribution`` with scores (n_test, n_train),
- ``_self_influence(idx) -> np.ndarray`` of shape (len(idx),),
- ``_settings() -> dict`` of its own settings.

Given ``models=[m_1, ..., m_E]`` the public ``attribute`` and ``self_influence`` run the method
once per model (each bound to its own copy of the method) and average the scores over the
models; a method whose estimator combines models differently (TRAK) overrides ``attribute``
and ``self_influence`` instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from iif.engine.engine import Budget, Engine
from iif.engine.features import DEFAULT_MAX_FEATURE_BYTES
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.projection import IdentityProjector, Projector
from iif.errors import InputError
from iif.io import jsonable
from iif.results.attribution import Attribution
from iif.results.diagnostics import log_flags, trust_flags
from iif.results.fitted import FittedState, fit_folder
from iif.results.runkey import method_key
from iif.task.data import take
from iif.task.measurements import check_values
from iif.task.task import Data, Task
from iif.validation import Limits, check_value, keyword_hint, without_none

log = logging.getLogger(__name__)

# training samples on which the task's measurement is evaluated once, at construction
MEASUREMENT_PROBE = 2


class AttributionMethod:
    """Base of the methods: ``attribute(test_data)`` and ``self_influence(indices)``.

    Args:
        task: the model (trained: theta*), target kind and training recipe.
        train_data: ``(inputs, labels)`` the model was trained on.
        models: optional independently trained models of the task's architecture; scores are
            averaged over them (an ensemble). Default: ``[task.model]``.
        chunk_size: samples per per-sample-gradient chunk (bounds memory).
        seed: seeds every random choice of the method (minibatches, dropout, projections).
        progress: progress reports (see iif.progress: None = bars on a terminal, log lines
            otherwise; False = none).
        max_feature_bytes: features larger than this are refused (use a projection), or with
            ``feature_dir`` memory-mapped from unnamed files in that folder.
        feature_dir: folder for memory-mapped features beyond ``max_feature_bytes`` (CPU).
    """

    method = "base"
    # ranges of the constructor keywords (types come from the signature); subclasses add theirs
    KEYWORD_LIMITS: ClassVar[dict[str, Limits]] = {
        "chunk_size": Limits(ge=1), "seed": Limits(ge=0), "max_feature_bytes": Limits(ge=0)}

    def __init__(
        self,
        task: Task,
        train_data: Any,
        *,
        models: Sequence[nn.Module] | None = None,
        chunk_size: int = 128,
        seed: int = 0,
        progress: bool | None = None,
        max_feature_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
        feature_dir: str | os.PathLike | None = None,
    ):
        # keyword settings: name -> (type hint, limits), checked again when the method runs
        self._checked: dict[str, tuple[Any, Limits]] = {}
        self.chunk_size = self._keyword("chunk_size", chunk_size)
        # seeds are >= 0 throughout the package, as numpy's generators (retraining) need
        self.seed = self._keyword("seed", seed)
        self.progress = self._keyword("progress", progress)
        self.max_feature_bytes = self._keyword("max_feature_bytes", max_feature_bytes)
        feature_dir = self._keyword("feature_dir", feature_dir)
        self.feature_dir = None if feature_dir is None else str(feature_dir)
        self.task = task
        self.train: Data = task.validate(train_data, "training data")
        # the engine of the task's model at theta* (frozen here), exact until the subclass's
        # settings are in place and its __init__ calls _reset
        self.engine = Engine.bind(task, self.train, task.model, self._budget())
        self._check_measurement()
        _warn_train_mode(task.model)
        self.models = _check_models(task.model, models)
        self._members: list[AttributionMethod] | None = None

    # ---- the engine's parts, as attributes -----------------------------------------------
    @property
    def fmodel(self) -> FunctionalModel:
        return self.engine.fmodel

    @property
    def state(self) -> ModelState:
        """theta*, frozen at construction."""
        return self.engine.state

    @property
    def projector(self) -> Projector:
        return self.engine.projector

    @property
    def sharding(self) -> Any:
        """This process's block of the training set, within :meth:`sharded`."""
        return self.engine.sharding

    @sharding.setter
    def sharding(self, value: Any) -> None:
        self.engine.sharding = value

    # ---- public API ----------------------------------------------------------------------
    def attribute(self, test_data: Any, **options: Any) -> Attribution:
        """Scores (n_test, n_train); positive = including the training sample raises the test
        loss. ``options`` go to the method (see its ``attribute``)."""
        self._validate_settings()
        test = self.validate_test(test_data)
        start = time.perf_counter()
        with self.engine.budget.spill():
            parts = [m._attribute(test, **options) for m in self.members()]
        result = parts[0] if len(parts) == 1 else self._combine(parts)
        result.info.setdefault("seconds", time.perf_counter() - start)
        result.info["ensemble_size"] = len(parts)
        self._say_route(result.info)
        return result

    def _say_route(self, info: dict[str, Any]) -> None:
        """How per-sample gradients are taken (``iif.engine.grads.gradient_route``): ``vmap``,
        or ``hooks`` with why and which layers."""
        fmodel = self.fmodel
        info["gradient_route"] = self.engine.gradient_route()  # probed once if not yet
        if fmodel.route_note is not None:
            plan = fmodel.hook_plans.get(tuple(fmodel.names))
            info["gradient_route_note"] = fmodel.route_note + (
                f"; {plan.summary()}" if plan is not None else "")

    def self_influence(self, indices: Any = None) -> np.ndarray:
        """Self-influence of training samples (default all), shape (n,), averaged over the
        ensemble: the score of each sample on its own loss. The most negative are the samples
        the model fits only through themselves, often mislabelled ones."""
        self._validate_settings()
        idx = self._indices(indices)
        with self.engine.budget.spill():
            return np.mean([m._self_influence(idx) for m in self.members()], axis=0)

    def fit(self, folder: str | os.PathLike | None = None) -> AttributionMethod:
        """Compute the training-side state once (training features at theta*, the factored
        curvature or kernel; see the method's ``_fitted_state``) and keep it, so that later
        ``attribute`` calls featurise only their test samples. With ``folder``, load the
        state from it when it holds this run's (same run key without the test data), else
        compute it and save it there (``iif.results.fitted``); another run's state is refused.
        A setting changed afterwards drops the state (it is computed again). Returns self."""
        self._validate_settings()
        if self.sharding is not None:
            raise InputError(f"{self.method}: fit runs in one process, outside sharded()")
        if folder is None:
            for member in self.members():
                member._fitted_state()
        else:
            members = self.members()

            def load(states: list[FittedState]) -> None:
                for member, state in zip(members, states, strict=True):
                    device = member.task.device
                    state.tensors = {k: t.to(device) for k, t in state.tensors.items()}
                    member._load_fitted(state)

            fit_folder(folder, method_key(self), self.settings(), self.method, len(members),
                       lambda: [m._fitted_state() for m in members], load)
        return self

    def validate_test(self, test_data: Any) -> Data:
        """``test_data`` checked and on the device, with the training inputs' sample shape."""
        return self.task.validate(test_data, "test data", like=self.train, stream=False)

    def settings(self) -> dict[str, Any]:
        """Everything that determines the scores, as recorded with them; checked first, so
        that a setting changed since construction is never recorded unchecked."""
        self._validate_settings()
        return {
            "method": self.method,
            "task": self.task.to_dict(),
            **self._settings(),
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "n_train": len(self.train),
            "ensemble_size": len(self.members()),
        }

    # ---- settings ------------------------------------------------------------------------
    @classmethod
    def check_keyword(cls, name: str, value: Any) -> Any:
        """``value`` of the constructor keyword ``name`` checked against its type hint and
        range (:attr:`KEYWORD_LIMITS` of the class or a base); no model needed, so settings
        can be checked before a task function runs."""
        return check_value(value, keyword_hint(cls, name), name, cls._keyword_limits(name))

    @classmethod
    def _keyword_limits(cls, name: str) -> Limits:
        return next((k.KEYWORD_LIMITS[name] for k in cls.__mro__
                     if name in getattr(k, "KEYWORD_LIMITS", {})), Limits())

    def _keyword(self, name: str, value: Any, default: Callable[[], Any] | None = None) -> Any:
        """The constructor keyword ``name`` checked (:meth:`check_keyword`); None becomes
        ``default()`` if given. The attribute of the same name is checked again by
        :meth:`_validate_settings`."""
        hint, rule = keyword_hint(type(self), name), self._keyword_limits(name)
        value = self.check_keyword(name, value)
        if default is not None:
            # the attribute is never None afterwards: a later None is an error, not a default
            hint = without_none(hint)
            value = default() if value is None else value
        self._checked[name] = (hint, rule)
        return value

    def _validate_settings(self) -> None:
        """Check every setting again: keyword settings and settings dataclasses may have been
        assigned since construction (``method.path.steps = 2.7``, ``method.seed = -1``); what
        was built from changed settings (projector, ensemble members) is built again, so the
        scores are always those of the settings they are recorded with."""
        for name, (hint, rule) in self._checked.items():
            value = getattr(self, name)
            checked = check_value(value, hint, name, rule)  # also re-runs a dataclass's checks
            if type(checked) is not type(value):  # a numpy scalar: record a Python number
                setattr(self, name, checked)
        built = getattr(self, "_built", None)
        if built is not None and built != self._built_from():
            log.info("%s: settings changed since construction; building its projector and "
                     "ensemble members again", self.method)
            self._members = None
            self._reset()
            self._mark_built()

    def _built_from(self) -> str:
        """The settings that the projector and the ensemble members were built from (members
        are copies: any attribute may differ once the method's own is assigned)."""
        state = {**self._settings(), "chunk_size": self.chunk_size, "seed": self.seed,
                 "progress": self.progress, "max_feature_bytes": self.max_feature_bytes,
                 "feature_dir": self.feature_dir}
        # the keywords as given, too: what _settings records may be derived from them
        for name in self._checked:
            value = getattr(self, name)
            state[f"keyword {name}"] = asdict(value) if is_dataclass(value) else value
        return json.dumps(jsonable(state), sort_keys=True)

    def _mark_built(self) -> None:
        """Record the settings the derived state was built from; a method's ``__init__`` ends
        with it."""
        self._built = self._built_from()

    # ---- what the infrastructure needs to know -------------------------------------------
    def store_chunk(self, n_test: int) -> int:
        """Test samples per chunk of the result store (``iif.results.store``) by default."""
        return 256

    def scores_test_set_as_one(self) -> bool:
        """Whether all test samples' scores come from one computation (a shared baseline):
        the store must then keep them in one chunk."""
        return False

    def shards_training_set(self) -> bool:
        """Whether this method's work on the training set serves every test sample, so that
        processes under torchrun split the training set (``iif.runs.distributed``) rather than
        the test samples."""
        return False

    @contextlib.contextmanager
    def sharded(self, sharding: Any) -> Iterator[None]:
        """Within this block the method (and every ensemble member) featurises only its
        block of the training set, ``sharding.rows(N)``, and sums across processes with
        ``sharding.all_reduce`` (an :class:`iif.runs.distributed.Sharding`)."""
        targets = {id(m): m for m in (self, *self.members())}.values()
        for member in targets:
            member.sharding = sharding
        try:
            yield
        finally:
            for member in targets:
                member.sharding = None

    # ---- ensembles -----------------------------------------------------------------------
    def members(self) -> list[AttributionMethod]:
        """One copy of this method bound to each model of the ensemble (self for one)."""
        if self._members is None:
            if len(self.models) == 1 and self.models[0] is self.task.model:
                self._members = [self]
            else:
                self._members = [self._bound_to(m) for m in self.models]
        return self._members

    def _bound_to(self, model: nn.Module) -> AttributionMethod:
        """A copy of this method with an engine of its own for ``model`` (its fmodel, theta*
        and projector: a Kronecker projector's hooks sit on that model's modules)."""
        member = copy.copy(self)
        member.engine = Engine.bind(self.task, self.train, model, self._budget(),
                                    sharding=self.engine.sharding)
        member.models = [model]
        member._members = [member]
        member._reset()
        return member

    def _budget(self) -> Budget:
        """The memory policy of the current settings."""
        feature_dir = None if self.feature_dir is None else str(self.feature_dir)
        return Budget(self.chunk_size, self.max_feature_bytes, feature_dir)

    def _make_projector(self, fmodel: FunctionalModel) -> Projector:
        """The projector of the current settings for the model ``fmodel`` (default: none)."""
        return IdentityProjector(fmodel.num_params)

    def _reset(self) -> None:
        """Bind the engine again with the current settings' projector and budget (same model,
        same theta*), dropping everything cached for the former; subclasses that cache more
        extend it."""
        self.engine = self.engine.rebound(self._make_projector(self.engine.fmodel),
                                          self._budget())

    def _combine(self, parts: list[Attribution]) -> Attribution:
        """The mean of the members' scores (and of their completeness sums and deltas)."""
        scores = np.mean([p.scores for p in parts], axis=0)
        completeness = None
        if all(p.completeness is not None for p in parts):
            total = np.mean([p.completeness["sum"] for p in parts], axis=0)
            delta = np.mean([p.completeness["delta"] for p in parts], axis=0)
            completeness = {"sum": total, "delta": delta, "gap": completeness_gap(total, delta)}
            if all("delta_path" in p.completeness for p in parts):
                # the members' path ends: the mean of theirs is what the mean scores add up to
                path = np.mean([p.completeness["delta_path"] for p in parts], axis=0)
                completeness.update(delta_path=path, gap_path=completeness_gap(total, path))
        info: dict[str, Any] = {"members": [p.info for p in parts]}
        # the members' fallbacks, truncations and unmoved baselines, and large gaps of the mean
        info["flags"] = trust_flags(completeness, info)
        log_flags(log, info["flags"], completeness, prefix=f"ensemble of {len(parts)}: ")
        return Attribution(scores, self.method, self.settings(), completeness, info)

    # ---- to implement --------------------------------------------------------------------
    def _attribute(self, test: Data, **options: Any) -> Attribution:
        raise NotImplementedError

    def _self_influence(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        return {}

    def _fitted_state(self) -> FittedState:
        """Fit this model's training side (kept in the method's caches, dropped by
        :meth:`_reset`) and return it as tensors and metadata (:mod:`iif.results.fitted`)."""
        raise InputError(f"{self.method} has no training-side state to fit")

    def _load_fitted(self, state: FittedState) -> None:
        """Take ``state`` (from :meth:`_fitted_state` of the same run) as the caches."""
        raise InputError(f"{self.method} has no training-side state to load")

    def key_parts(self) -> dict[str, str]:
        """Digests of inputs beyond the models, data and settings that determine the scores
        (``iif.results.runkey``), by part name; e.g. TracIn's checkpoint contents."""
        return {}

    # ---- helpers -------------------------------------------------------------------------
    def _check_measurement(self) -> None:
        """The task's measurement evaluated once on the first training samples' outputs at
        theta* (:func:`iif.task.measurements.check_values`): a wrong shape or a value without
        a gradient is refused now, not turned into wrong or all-zero scores later."""
        if self.task.measurement is None:
            return
        x = take(self.train.x, slice(0, MEASUREMENT_PROBE))
        x = x if isinstance(x, torch.Tensor) else x[:]  # streamed inputs: read these few
        outputs = self.engine.outputs(self.state, x)
        check_values(self.task.measurement, self.task.shaped(outputs),
                     self.train.targets[:MEASUREMENT_PROBE])

    def _indices(self, indices: Any) -> np.ndarray:
        n = len(self.train)
        idx = np.arange(n) if indices is None else np.asarray(indices)
        if (idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer)
                or idx.min() < 0 or idx.max() >= n):
            raise InputError(f"indices must be a non-empty 1-d integer array within 0..{n - 1}")
        return idx.astype(np.int64)


_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _warn_train_mode(model: nn.Module) -> None:
    """Gradients, features and losses are always taken in eval mode (dropout off, BatchNorm on
    its running statistics); a model handed over in train mode gets told so once."""
    layers = [type(m).__name__ for m in model.modules()
              if m.training and isinstance(m, _MODE_DEPENDENT)]
    if layers:
        log.warning("the model is in train mode (%s); gradients, features and losses use eval "
                    "mode (dropout off, BatchNorm running statistics); training epochs keep "
                    "train mode", ", ".join(sorted(set(layers))))


def completeness_gap(total: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """|sum - delta| / |delta| per test sample; NaN where delta = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(delta != 0, np.abs(total - delta) / np.abs(delta), np.nan)


def _check_models(reference: nn.Module, models: Sequence[nn.Module] | None) -> list[nn.Module]:
    if models is None:
        return [reference]
    models = list(models)
    if not models:
        raise InputError("models must hold at least one model")
    want = {k: tuple(p.shape) for k, p in reference.named_parameters() if p.requires_grad}
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
        params = [p for p in m.parameters() if p.requires_grad]
        got = {k: tuple(p.shape) for k, p in m.named_parameters() if p.requires_grad}
        if got != want:
            raise InputError(
                f"models[{i}] does not have the task model's trainable parameters "
                f"(names and shapes must match)"
            )
        ref = next(p for p in reference.parameters() if p.requires_grad)
        if any(p.device != ref.device or p.dtype != ref.dtype for p in params):
            raise InputError(f"models[{i}] must be on {ref.device} with dtype {ref.dtype}, like "
                             f"the task model")
    return models
