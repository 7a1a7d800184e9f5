"""The ``use_fused_gspo_loss`` and ``fused_gspo_logits_dtype`` fields, added to TRL's config dataclasses and removed
again.

A real dataclass field: ``dataclasses.fields()`` lists it (so ``to_dict()`` and the saved training arguments carry
it), ``HfArgumentParser`` / ``TrlParser`` read its type from the class annotations (so ``--use_fused_gspo_loss true``
works on the command line), the constructor accepts it as a keyword (and ``inspect.signature`` shows it), and equality
and ``repr`` take it into account. :func:`remove_flag_field` undoes every one of those changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from ..precision import normalize_logits_dtype

FLAG = "use_fused_gspo_loss"
FLAG_HELP = (
    "Compute the loss with fused_gspo's fused LM-head kernels (same numbers as TRL, without the [tokens, vocab] "
    "logits). Also enables importance_sampling_level='sequence_token' (GSPO-token) on the GRPO trainer."
)
LOGITS_FIELD = "fused_gspo_logits_dtype"
LOGITS_HELP = (
    "With use_fused_gspo_loss: how each chunk's logits are staged. 'auto': in the head's 16-bit dtype under bf16/fp16 "
    "(as TRL's own chunked head stages them); 'float32': in fp32, more precise than TRL."
)
# (name, type, default, help) of every field the adapter adds, in order
FIELDS = ((FLAG, bool, False, FLAG_HELP), (LOGITS_FIELD, str, "auto", LOGITS_HELP))

# cls -> (the class-dict entries replaced, by name (None: absent), whether it had its own __annotations__ dict)
_originals: dict[type, tuple] = {}
_REPLACED = ("__init__", "__eq__", "__repr__")


def add_flag_field(cls: type) -> None:
    """Give the dataclass ``cls`` the fields of :data:`FIELDS` (``use_fused_gspo_loss: bool = False``,
    ``fused_gspo_logits_dtype: str = "auto"``; idempotent). A bad ``fused_gspo_logits_dtype`` fails the config's
    construction, naming the field."""
    if "__dataclass_fields__" not in cls.__dict__:
        # a plain subclass shares its base's field dict: adding to it would change the base
        raise TypeError(f"{cls.__name__} is not itself a dataclass")
    if FLAG in cls.__dataclass_fields__:
        return
    added = []
    for name, kind, default, help_text in FIELDS:
        spec = dataclasses.field(default=default, metadata={"help": help_text})
        spec.name, spec.type = name, kind
        spec._field_type = dataclasses._FIELD  # what dataclasses.fields() selects on
        added.append(spec)
    original_init, original_eq, original_repr = cls.__init__, cls.__eq__, cls.__repr__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        values = {name: kwargs.pop(name, default) for name, _, default, _ in FIELDS}
        object.__setattr__(self, FLAG, bool(values[FLAG]))
        try:
            object.__setattr__(self, LOGITS_FIELD, normalize_logits_dtype(values[LOGITS_FIELD]))
        except ValueError as exc:
            raise ValueError(f"{LOGITS_FIELD}: {exc}") from None
        original_init(self, *args, **kwargs)

    signature = inspect.signature(original_init)
    keywords = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=k) for n, k, d, _ in FIELDS]
    params = list(signature.parameters.values())
    last = len(params) - int(bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    __init__.__signature__ = signature.replace(parameters=[*params[:last], *keywords, *params[last:]])

    def __eq__(self, other):
        same = original_eq(self, other)
        if same is not True:
            return same
        return all(getattr(self, n, d) == getattr(other, n, d) for n, _, d, _ in FIELDS)

    def __repr__(self):
        text = original_repr(self)
        extra = "".join(f", {n}={getattr(self, n, d)!r}" for n, _, d, _ in FIELDS)
        return f"{text[:-1]}{extra})" if text.endswith(")") else text

    had_annotations = "__annotations__" in cls.__dict__
    _originals[cls] = ({name: cls.__dict__.get(name) for name in _REPLACED}, had_annotations)
    if not had_annotations:
        # its own dict, so that removing the flag can drop it and leave the class as it was
        cls.__annotations__ = {}
    for spec in added:
        cls.__annotations__[spec.name] = spec.type
        cls.__dataclass_fields__[spec.name] = spec
        setattr(cls, spec.name, spec.default)
    cls.__init__, cls.__eq__, cls.__repr__ = __init__, __eq__, __repr__


def remove_flag_field(cls: type) -> None:
    """Undo :func:`add_flag_field` (a no-op if ``cls`` does not have the fields from it)."""
    if cls not in _originals:
        return
    replaced, had_annotations = _originals.pop(cls)
    for name, original in replaced.items():
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    for name, *_ in FIELDS:
        del cls.__dataclass_fields__[name]
        del cls.__annotations__[name]
        delattr(cls, name)
    if not had_annotations:
        del cls.__annotations__


def has_flag_field(cls: type) -> bool:
    return cls in _originals


def flag_on(trainer) -> bool:
    """Whether a trainer's arguments switch the fused loss on."""
    return bool(getattr(trainer.args, FLAG, False))


def logits_dtype_of(trainer) -> str:
    """The staging a trainer's arguments ask for (``"auto"`` unless ``fused_gspo_logits_dtype`` says otherwise)."""
    return normalize_logits_dtype(getattr(trainer.args, LOGITS_FIELD, "auto"))


def init_validated_by(validate):
    """A replacement factory for a trainer's ``__init__``: TRL's own, then ``validate(trainer)`` when the flag is on,
    so what the fused loss cannot reproduce fails at construction."""

    def factory(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if flag_on(self):
                validate(self)

        return __init__

    return factory
