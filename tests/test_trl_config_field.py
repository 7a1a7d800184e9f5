"""fused_gspo.trl.config_field: the ``use_fused_gspo_loss`` field on TRL's config dataclasses, added and removed.

The field must be a real dataclass field (``dataclasses.fields()``, ``to_dict()``, the constructor, command lines
through ``HfArgumentParser`` / ``TrlParser``), and removing it must give back the class exactly as it was.
"""

import dataclasses
import inspect
import typing

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import HfArgumentParser  # noqa: E402
from trl_helpers import assert_autouse_fixtures_active  # noqa: E402

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import fused_calls_fixture as fused_calls_fixture  # noqa: E402
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402

import fused_gspo  # noqa: E402
from fused_gspo.trl import FLAG, GFPOConfig, is_patched, patch_trl, unpatch_trl  # noqa: E402
from fused_gspo.trl.config_field import (  # noqa: E402
    FLAG_HELP,
    LOGITS_FIELD,
    add_flag_field,
    has_flag_field,
    remove_flag_field,
)


def config_classes():
    from trl.experimental.gmpo import GMPOConfig

    return [trl.GRPOConfig, trl.RLOOConfig, GMPOConfig]


# the three config classes patch_trl() gives the field (GMPOConfig is a dataclass subclass of GRPOConfig)
CONFIG_CLASSES = ["GRPOConfig", "RLOOConfig", "GMPOConfig"]


def config_class(name: str) -> type:
    return {cls.__name__: cls for cls in config_classes()}[name]


BASE_ARGS = ["--output_dir", "/tmp/x", "--use_cpu", "true", "--report_to", "none"]


def snapshot(cls: type) -> dict:
    """Everything add_flag_field touches: the class dict, the fields and the annotations (by identity)."""
    return {
        "dict": dict(cls.__dict__),
        "fields": dict(cls.__dataclass_fields__),
        "own_annotations": "__annotations__" in cls.__dict__,
        "annotations": dict(cls.__dict__.get("__annotations__", {})),
    }


def assert_same_snapshot(after: dict, before: dict) -> None:
    assert after["own_annotations"] == before["own_annotations"]
    for part in ("dict", "fields", "annotations"):
        assert after[part].keys() == before[part].keys(), part
        for name, value in before[part].items():
            assert after[part][name] is value, (part, name)


@pytest.fixture
def scratch_classes():
    """Dataclasses given the field in a test: their field is removed at teardown, whatever the test did."""
    classes = []
    yield classes
    for cls in classes:
        remove_flag_field(cls)


def test_autouse_fixtures_apply_here(request):
    assert_autouse_fixtures_active(request)


# ---------------------------------------------------------------------------------------------------------------
# On TRL's config classes


def test_flag_is_a_real_dataclass_field():
    names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    assert FLAG in names
    (parsed,) = HfArgumentParser(trl.GRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--use_cpu", "true", "--report_to", "none", "--use_fused_gspo_loss", "true"]
    )
    assert parsed.use_fused_gspo_loss is True and parsed.to_dict()[FLAG] is True
    assert trl.GRPOConfig(output_dir="/tmp/x", use_cpu=True).use_fused_gspo_loss is False
    patch_trl()  # idempotent
    unpatch_trl()
    assert FLAG not in {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    with pytest.raises(TypeError):
        trl.GRPOConfig(output_dir="/tmp/x", use_cpu=True, use_fused_gspo_loss=True)
    fused_gspo.patch_trl()
    assert FLAG in {f.name for f in dataclasses.fields(trl.RLOOConfig)}


# TRL's three config classes that get the flag
@pytest.mark.parametrize("name", CONFIG_CLASSES)
def test_field_on_each_config_class(name):
    cls = config_class(name)
    assert has_flag_field(cls)
    (field,) = [f for f in dataclasses.fields(cls) if f.name == FLAG]
    assert field.type is bool and field.default is False and field.init
    assert field.metadata["help"] == FLAG_HELP
    assert typing.get_type_hints(cls)[FLAG] is bool
    assert getattr(cls, FLAG) is False  # the class default, as a dataclass field with a default has
    on = cls(output_dir="/tmp/x", use_cpu=True, report_to=[], use_fused_gspo_loss=True)
    off = cls(output_dir="/tmp/x", use_cpu=True, report_to=[])
    assert on.use_fused_gspo_loss is True and off.use_fused_gspo_loss is False
    assert on.to_dict()[FLAG] is True and off.to_dict()[FLAG] is False
    assert dataclasses.asdict(on)[FLAG] is True


# each parser on each config class: the flag given as "true", as a bare switch, as "false", and left out
@pytest.mark.parametrize("name", CONFIG_CLASSES)
@pytest.mark.parametrize("parser", ["HfArgumentParser", "TrlParser"])
@pytest.mark.parametrize(
    "cli,expected",
    [(["--use_fused_gspo_loss", "true"], True), (["--use_fused_gspo_loss"], True),
     (["--use_fused_gspo_loss", "false"], False), ([], False)],
    ids=["true", "switch", "false", "default"],
)  # fmt: skip
def test_command_line(name, parser, cli, expected):
    cls = config_class(name)
    if parser == "TrlParser":
        (parsed,) = trl.TrlParser(cls).parse_args_and_config(BASE_ARGS + cli)
    else:
        (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(BASE_ARGS + cli)
    assert type(parsed) is cls and parsed.use_fused_gspo_loss is expected


def test_trl_parser_reads_the_flag_from_a_config_file_and_a_dict(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("use_fused_gspo_loss: true\n")
    (parsed,) = trl.TrlParser(trl.GRPOConfig).parse_args_and_config(BASE_ARGS + ["--config", str(config)])
    assert parsed.use_fused_gspo_loss is True
    (parsed,) = trl.TrlParser(trl.GRPOConfig).parse_dict(dict(output_dir="/tmp/x", use_cpu=True, **{FLAG: True}))
    assert parsed.use_fused_gspo_loss is True
    assert FLAG_HELP.split(" (")[0] in " ".join(HfArgumentParser(trl.GRPOConfig).format_help().split())


def test_unpatch_restores_the_config_classes_exactly():
    unpatch_trl()
    assert not is_patched()
    before = {cls: snapshot(cls) for cls in config_classes()}
    patch_trl()
    for cls in config_classes():
        assert FLAG in cls.__dataclass_fields__ and FLAG in cls.__dict__["__annotations__"]
        assert cls.__dict__["__init__"] is not before[cls]["dict"]["__init__"]
    unpatch_trl()
    for cls in config_classes():
        assert not has_flag_field(cls)
        assert_same_snapshot(snapshot(cls), before[cls])
        with pytest.raises(TypeError):
            cls(output_dir="/tmp/x", use_cpu=True, use_fused_gspo_loss=True)


def test_patch_and_unpatch_are_idempotent():
    inits = {cls: cls.__dict__["__init__"] for cls in config_classes()}
    fields = {cls: cls.__dataclass_fields__[FLAG] for cls in config_classes()}
    patch_trl()
    for cls in config_classes():
        add_flag_field(cls)
        assert cls.__dict__["__init__"] is inits[cls] and cls.__dataclass_fields__[FLAG] is fields[cls]
    assert [f.name for f in dataclasses.fields(trl.GRPOConfig)].count(FLAG) == 1
    unpatch_trl()
    before = {cls: snapshot(cls) for cls in config_classes()}
    unpatch_trl()
    for cls in config_classes():
        remove_flag_field(cls)  # a no-op on a class without the field
        assert_same_snapshot(snapshot(cls), before[cls])


def test_a_class_that_declares_the_field_itself_is_left_alone():
    """GFPOConfig declares ``use_fused_gspo_loss`` itself: adding is a no-op, and so is removing."""
    before = snapshot(GFPOConfig)
    add_flag_field(GFPOConfig)
    assert not has_flag_field(GFPOConfig)
    assert_same_snapshot(snapshot(GFPOConfig), before)
    remove_flag_field(GFPOConfig)
    assert_same_snapshot(snapshot(GFPOConfig), before)
    assert GFPOConfig(output_dir="/tmp/x", use_cpu=True, use_fused_gspo_loss=True).use_fused_gspo_loss is True


# ---------------------------------------------------------------------------------------------------------------
# On plain dataclasses: the cases TRL's classes do not show


@dataclasses.dataclass
class Base:
    x: int = 1


@dataclasses.dataclass
class Annotated(Base):
    y: str = "y"

    def __post_init__(self):
        self.flag_seen_in_post_init = getattr(self, FLAG, None)


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: int = 1


def bare_subclass() -> type:
    """A dataclass without its own ``__annotations__`` (no fields of its own; made fresh, as reading
    ``cls.__annotations__`` on Python >= 3.10 creates the class's own dict)."""

    @dataclasses.dataclass
    class Bare(Base):
        pass

    assert "__annotations__" not in Bare.__dict__
    return Bare


# a class with its own annotations, one without (annotations only on its base), and a frozen one
PLAIN_CLASSES = {"annotated": lambda: Annotated, "bare_subclass": bare_subclass, "frozen": lambda: Frozen}


# plain dataclasses with and without their own annotations, and a frozen one
@pytest.mark.parametrize("kind", list(PLAIN_CLASSES))
def test_plain_dataclass_gets_the_field_and_is_restored_exactly(scratch_classes, kind):
    cls = PLAIN_CLASSES[kind]()
    before, base_before = snapshot(cls), snapshot(Base)
    add_flag_field(cls)
    scratch_classes.append(cls)
    assert has_flag_field(cls)
    assert [f.name for f in dataclasses.fields(cls)][-2:] == [FLAG, LOGITS_FIELD]
    assert cls.__dict__["__annotations__"][FLAG] is bool and typing.get_type_hints(cls)[FLAG] is bool
    assert_same_snapshot(snapshot(Base), base_before)  # the base class is not touched
    assert (
        "__annotations__" not in before["dict"] or cls.__dict__["__annotations__"] is before["dict"]["__annotations__"]
    )

    obj = cls(5, use_fused_gspo_loss=1)  # positional arguments pass through; the flag is stored as a bool
    assert obj.x == 5 and obj.use_fused_gspo_loss is True
    assert cls().use_fused_gspo_loss is False
    assert dataclasses.asdict(obj)[FLAG] is True
    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(["--x", "3", "--use_fused_gspo_loss", "true"])
    assert parsed.x == 3 and parsed.use_fused_gspo_loss is True
    if kind == "annotated":  # set before the dataclass __init__ runs: __post_init__ sees it
        assert obj.flag_seen_in_post_init is True
    with pytest.raises(TypeError):
        Base(use_fused_gspo_loss=True)

    remove_flag_field(cls)
    assert not has_flag_field(cls)
    assert_same_snapshot(snapshot(cls), before)
    assert_same_snapshot(snapshot(Base), base_before)
    with pytest.raises(TypeError):
        cls(use_fused_gspo_loss=True)
    assert FLAG not in {f.name for f in dataclasses.fields(cls)}
    remove_flag_field(cls)  # again: a no-op
    assert_same_snapshot(snapshot(cls), before)


def test_add_flag_field_is_idempotent_on_a_plain_dataclass(scratch_classes):
    cls = bare_subclass()
    add_flag_field(cls)
    scratch_classes.append(cls)
    state = snapshot(cls)
    add_flag_field(cls)
    assert_same_snapshot(snapshot(cls), state)
    remove_flag_field(cls)
    assert "__annotations__" not in cls.__dict__ and FLAG not in cls.__dataclass_fields__


# the same three kinds of dataclass
@pytest.mark.parametrize("kind", list(PLAIN_CLASSES))
def test_flag_takes_part_in_equality_repr_and_signature(scratch_classes, kind):
    cls = PLAIN_CLASSES[kind]()
    add_flag_field(cls)
    scratch_classes.append(cls)
    on, off = cls(use_fused_gspo_loss=True), cls()
    assert on != off and on == cls(use_fused_gspo_loss=True) and off == cls()
    assert repr(on).endswith(f"{FLAG}=True, {LOGITS_FIELD}='auto')")
    assert repr(off).endswith(f"{FLAG}=False, {LOGITS_FIELD}='auto')")
    parameter = inspect.signature(cls).parameters[FLAG]
    assert parameter.default is False and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    # the staging option: a field of its own, in equality, normalized and checked by name
    staged = cls(use_fused_gspo_loss=True, fused_gspo_logits_dtype=torch.float32)
    assert staged.fused_gspo_logits_dtype == "float32" and staged != on
    assert inspect.signature(cls).parameters[LOGITS_FIELD].default == "auto"
    with pytest.raises(ValueError, match=LOGITS_FIELD):
        cls(fused_gspo_logits_dtype="bf16")
    remove_flag_field(cls)
    assert FLAG not in inspect.signature(cls).parameters and FLAG not in repr(cls())
    assert LOGITS_FIELD not in inspect.signature(cls).parameters and LOGITS_FIELD not in repr(cls())


def test_a_plain_subclass_of_a_dataclass_is_refused():
    """It shares its base's field dict: adding the field to it would add it to the base."""

    class Plain(Base):
        pass

    with pytest.raises(TypeError, match="not itself a dataclass"):
        add_flag_field(Plain)
    assert FLAG not in Base.__dataclass_fields__
