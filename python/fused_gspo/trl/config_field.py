"""The ``use_fused_gspo_loss`` field, added to TRL's config dataclasses and removed again.

A real dataclass field: ``dataclasses.fields()`` lists it (so ``to_dict()`` and the saved training arguments carry
it), ``HfArgumentParser`` / ``TrlParser`` read its type from the class annotations (so ``--use_fused_gspo_loss true``
works on the command line), the constructor accepts it as a keyword (and ``inspect.signature`` shows it), and equality
and ``repr`` take it into account. :func:`remove_flag_field` undoes every one of those changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

FLAG = "use_fused_gspo_loss"
FLAG_HELP = (
    "Compute the loss with fused_gspo's fused LM-head kernels (same numbers as TRL, without the [tokens, vocab] "
    "logits). Also enables importance_sampling_level='sequence_token' (GSPO-token) on the GRPO trainer."
)

# cls -> (the class-dict entries replaced, by name (None: absent), whether it had its own __annotations__ dict)
_originals: dict[type, tuple] = {}
_REPLACED = ("__init__", "__eq__", "__repr__")


def add_flag_field(cls: type) -> None:
    """Give the dataclass ``cls`` the field ``use_fused_gspo_loss: bool = False`` (idempotent)."""
    if "__dataclass_fields__" not in cls.__dict__:
        # a plain subclass shares its base's field dict: adding to it would change the base
        raise TypeError(f"{cls.__name__} is not itself a dataclass")
    if FLAG in cls.__dataclass_fields__:
        return
    flag = dataclasses.field(default=False, metadata={"help": FLAG_HELP})
    flag.name, flag.type = FLAG, bool
    flag._field_type = dataclasses._FIELD  # what dataclasses.fields() selects on
    original_init, original_eq, original_repr = cls.__init__, cls.__eq__, cls.__repr__

    @functools.wraps(original_init)
    def __init__(self, *args, use_fused_gspo_loss: bool = False, **kwargs):
        object.__setattr__(self, FLAG, bool(use_fused_gspo_loss))
        original_init(self, *args, **kwargs)

    signature = inspect.signature(original_init)
    keyword = inspect.Parameter(FLAG, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    params = list(signature.parameters.values())
    last = len(params) - int(bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    __init__.__signature__ = signature.replace(parameters=[*params[:last], keyword, *params[last:]])

    def __eq__(self, other):
        same = original_eq(self, other)
        if same is not True:
            return same
        return getattr(self, FLAG, False) == getattr(other, FLAG, False)

    def __repr__(self):
        text = original_repr(self)
        return f"{text[:-1]}, {FLAG}={getattr(self, FLAG, False)!r})" if text.endswith(")") else text

    had_annotations = "__annotations__" in cls.__dict__
    _originals[cls] = ({name: cls.__dict__.get(name) for name in _REPLACED}, had_annotations)
    if not had_annotations:
        # its own dict, so that removing the flag can drop it and leave the class as it was
        cls.__annotations__ = {}
    cls.__annotations__[FLAG] = bool
    cls.__dataclass_fields__[FLAG] = flag
    setattr(cls, FLAG, False)
    cls.__init__, cls.__eq__, cls.__repr__ = __init__, __eq__, __repr__


def remove_flag_field(cls: type) -> None:
    """Undo :func:`add_flag_field` (a no-op if ``cls`` does not have the field from it)."""
    if cls not in _originals:
        return
    replaced, had_annotations = _originals.pop(cls)
    for name, original in replaced.items():
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    del cls.__dataclass_fields__[FLAG]
    del cls.__annotations__[FLAG]
    if not had_annotations:
        del cls.__annotations__
    delattr(cls, FLAG)


def has_flag_field(cls: type) -> bool:
    return cls in _originals


def flag_on(trainer) -> bool:
    """Whether a trainer's arguments switch the fused loss on."""
    return bool(getattr(trainer.args, FLAG, False))


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
