"""Config building: YAML presets, dotted overrides, type coercion and clear errors; every
field of every config declares its valid values and refuses the rest."""

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest

from saelab import config as C
from saelab import fields as F
from saelab.errors import UserError


def test_field_docs_are_read_from_source():
    docs = F.field_docs(C.TrainConfig)
    assert docs["batch_size"] == "Tokens per optimizer step."
    assert set(docs) == {f for f in C.TrainConfig.__dataclass_fields__}


CONFIGS = [
    obj
    for name, obj in vars(C).items()
    if name.endswith("Config") and dataclasses.is_dataclass(obj) and obj.__module__ == C.__name__
]


def test_every_field_of_every_config_has_a_doc():
    for cls in CONFIGS:
        assert set(F.field_docs(cls)) == set(cls.__dataclass_fields__), cls.__name__


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("harvest: h\nsae:\n  k: 16\n  d_sae: 256\nlr: 0.001\n")
    cfg = F.build(C.TrainConfig, p, {"sae.k": "8", "wandb": "true", "betas": "0.8,0.9"})
    assert cfg.sae.k == 8 and cfg.sae.d_sae == 256 and cfg.lr == 0.001
    assert cfg.wandb is True and cfg.betas == (0.8, 0.9)
    assert isinstance(cfg.sae, C.SAEConfig)


def test_list_field_from_comma_string():
    cfg = F.build(
        C.HarvestConfig, None, {"hooks": "blocks.0.hook_resid_post,blocks.1.hook_resid_post"}
    )
    assert cfg.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.mark.parametrize(
    "overrides,msg",
    [
        ({"batch_sise": 3}, "unknown config key 'batch_sise'; did you mean 'batch_size'"),
        ({"sae.kk": 3}, "did you mean 'sae.k'"),
        ({"sae.k": 4096}, "k=4096 must be smaller than d_sae=4096"),
        ({"lr": -1}, "lr=-1.0 must not be negative"),
        ({"batch_size": "many"}, "batch_size='many' is not a valid int"),
        ({"wandb": "maybe"}, "not a boolean"),
        ({"wandb_mode": "cloud"}, "is not one of online, offline"),
        ({"lr_decay_frac": 2}, "lr_decay_frac=2.0 must lie in"),
    ],
)
def test_bad_values_name_the_problem(overrides, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        F.build(C.TrainConfig, None, overrides)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        F.load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        F.load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        F.load_yaml(lst)


def test_lr_scaling_rule():
    cfg = C.TrainConfig(sae=C.SAEConfig(d_sae=2**14), lr_base=1e-3)
    assert cfg.resolved_lr() == pytest.approx(1e-3)
    cfg = C.TrainConfig(sae=C.SAEConfig(d_sae=2**12), lr_base=1e-3)
    assert cfg.resolved_lr() == pytest.approx(2e-3)
    assert C.TrainConfig(lr=5e-4).resolved_lr() == 5e-4


def test_harvest_checks():
    with pytest.raises(UserError, match="n_ctx=1"):
        C.HarvestConfig(n_ctx=1)
    with pytest.raises(UserError, match=r"hooks=\[\] must not be empty"):
        C.HarvestConfig(hooks=[])
    with pytest.raises(UserError, match="n_tokens=0 must be positive"):
        C.HarvestConfig(n_tokens=0)


@pytest.mark.parametrize(
    "cls,old,new",
    [
        (C.HarvestConfig, "out_dir", "out"),
        (C.HarvestConfig, "name", "out"),
        (C.EvalConfig, "downstream_contexts", "ce_contexts"),
        (C.IndexConfig, "top_n", "top_contexts"),
        (C.IndexConfig, "tokens", "n_tokens"),
        (C.DarkMatterConfig, "eval_tokens", "score_tokens"),
    ],
)
def test_old_names_are_refused_with_the_new_one(cls, old, new):
    with pytest.raises(UserError, match=f"unknown config key '{old}'; did you mean '{new}'"):
        F.build(cls, None, {old: 1})


@pytest.mark.parametrize(
    "argv,new",
    [
        (["index", "r", "--top_n", "3"], "--top_contexts"),
        (["harvest", "--out_dir", "x"], "--out"),
        (["darkmatter", "r", "--eval_tokens", "9"], "--score_tokens"),
        (["eval", "r", "--downstream_contexts", "9"], "--ce_contexts"),
    ],
)
def test_cli_refuses_old_flags_naming_the_new_one(argv, new, capsys):
    from saelab.cli import main

    assert main(argv) == 2
    assert f"did you mean '{new}'" in capsys.readouterr().err


def test_arch_choices_come_from_the_type(capsys):
    from saelab.cli import main

    assert main(["train", "--help"]) == 0
    choices = "topk|gradient_topk|feature_choice|mutual_choice|matching_pursuit"
    assert choices in capsys.readouterr().out
    with pytest.raises(UserError, match="sae.arch='topkk' is not one of topk, gradient_topk"):
        F.build(C.TrainConfig, None, {"sae.arch": "topkk"})


# ---------------------------------------------------------------------------------------
# No field unchecked: each declares its valid values, and a value outside them is refused


def test_the_walk_finds_every_config():
    names = {cls.__name__ for cls in CONFIGS}
    assert names == {
        "HarvestConfig", "SAEConfig", "TrainConfig", "EvalConfig", "DarkMatterConfig",
        "IndexConfig", "ExplainConfig",
    }  # fmt: skip


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any, F.Check | None, Any]]:
    """(dotted name, type, declared Check, default) of every leaf field, nested configs
    walked into; read from the annotations themselves, not from saelab's own helpers."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        tp, check = hints[f.name], None
        if typing.get_origin(tp) is Annotated:
            tp, *extras = typing.get_args(tp)
            check = next((e for e in extras if isinstance(e, F.Check)), None)
        if dataclasses.is_dataclass(tp):
            out += leaves(typing.cast(type, tp), prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append((prefix + f.name, tp, check, default))
    return out


def undeclared(cls: type) -> list[str]:
    """Fields that state no valid values: no Check, and a type that lists no choices."""
    return [
        name
        for name, tp, check, _ in leaves(cls)
        if check is None and not (typing.get_origin(tp) is Literal or tp is bool)
    ]


def test_every_field_declares_its_valid_values():
    for cls in CONFIGS:
        assert undeclared(cls) == [], f"{cls.__name__}: annotate these with a Check"
        for name, tp, check, _ in leaves(cls):
            if tp in (int, float):  # a number always has a range
                assert check is not None and not check.free, f"{cls.__name__}.{name}"


def test_a_field_without_a_check_is_caught():
    @dataclass
    class Careless:
        fine: Annotated[int, F.Check(ge=0)] = 0
        mode: Literal["a", "b"] = "a"
        forgot: int = 3

    assert undeclared(Careless) == ["forgot"]
    with pytest.raises(TypeError, match="Careless.forgot declares no valid values"):
        F.constraints(Careless)
    with pytest.raises(TypeError, match="declares a bound"):
        F.Check()


def outside(tp: Any, c: F.Check) -> list[Any]:
    """The nearest values beyond each declared bound."""
    step = (lambda x, d: x + d) if tp is int else (lambda x, d: math.nextafter(x, d * math.inf))
    out = []
    if c.ge is not None:
        out.append(step(c.ge, -1))
    if c.gt is not None:
        out.append(tp(c.gt))
    if c.le is not None:
        out.append(step(c.le, 1))
    if c.lt is not None:
        out.append(tp(c.lt))
    return out


def bad_values(tp: Any, check: F.Check | None, default: Any) -> list[Any]:
    """Values a user could give (command-line strings or YAML values) that a field of this
    type and Check must refuse, derived from the declaration alone."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if check is None and tp in (int, float, str):
        return []  # undeclared: test_every_field_declares_its_valid_values names it
    if origin is Literal:
        return ["not-a-choice", 1, ""]
    if tp is bool:
        return ["maybe", "2", 0.5]
    if tp is int:
        assert check is not None
        return [*outside(int, check), "many", "1.5", "inf", "nan", True, ["1"]]
    if tp is float:
        assert check is not None
        nonfinite = ["nan", "inf", "-inf", math.nan, math.inf] if check.finite else []
        return [*outside(float, check), *nonfinite, "many", False, ["1"]]
    if tp is str:
        assert check is not None
        bad: list[Any] = [["a", "b"], {"a": 1}]  # YAML sequences and mappings
        if check.nonempty or check.pattern:
            bad += ["", "   "]
        if check.pattern:
            bad += ["#" + default, default + "#", default.upper() + "!"]
        return bad
    if origin is tuple:
        n, items = len(args), [str(v) for v in default]
        bad = [",".join(items[:-1]), ",".join(items + items[-1:]), "a" * 3]
        for i, item_tp in enumerate(args):
            for v in bad_values(item_tp, check, default[i]):
                if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != "":
                    bad.append(",".join(str(v) if j == i else items[j] for j in range(n)))
        return bad
    if origin is list and dataclasses.is_dataclass(args[0]):
        return ["x", [1], ["x"], {"k": 1}]
    if origin is list:
        bad = [{"a": 1}]
        if check is not None and check.nonempty:
            bad += ["", ",", [], [""], [*default, ""]]
        return bad
    raise AssertionError(f"no bad values known for {tp}")


CASES = [
    (cls, name, value)
    for cls in CONFIGS
    for name, tp, check, default in leaves(cls)
    for value in bad_values(tp, check, default)
]


def test_every_field_gets_bad_values():
    covered = {(cls, name) for cls, name, _ in CASES}
    assert covered == {(cls, name) for cls in CONFIGS for name, *_ in leaves(cls)}
    assert len(CASES) > 300


def _one_line_naming(error: UserError, name: str) -> None:
    msg = str(error)
    assert "\n" not in msg, msg
    assert msg.startswith((name + "=", name + " ")), msg


@pytest.mark.parametrize(
    "cls,name,value", CASES, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CASES]
)
def test_a_bad_value_is_refused_in_one_line_naming_the_field(cls, name, value):
    with pytest.raises(UserError) as built:
        F.build(cls, None, {name: value})
    _one_line_naming(built.value, name)
    if "." not in name:  # the same value given to the constructor: validate() alone refuses
        with pytest.raises(UserError) as made:
            cls(**{name: value})
        _one_line_naming(made.value, name)


def test_defaults_are_valid_and_the_rules_reach_help(capsys):
    for cls in CONFIGS:
        cls()
    from saelab.cli import main

    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Tokens in the shuffle buffer. (must be positive; default: 262144)" in help_text
    assert "(must lie in (0, 1); default: 0.99)" in help_text
    assert "(each item must lie in [0, 1); default: (0.9, 0.999))" in help_text


@pytest.mark.parametrize(
    "overrides,msg",
    [
        ({"k_aux": 4097}, "k_aux=4097 exceeds d_sae=4096"),
        ({"k_aux": 65, "sweep": [{"d_sae": 128}, {"d_sae": 64}]}, "k_aux=65 exceeds d_sae=64"),
        ({"sweep": [{"k": 0}]}, "sweep[0].k=0 must be positive"),
        ({"sweep": [{"k": 8, "d_sae": 8}]}, "sweep[0].k=8 must be smaller than d_sae=8"),
        ({"sae.k": 64, "sae.d_sae": 64}, "sae.k=64 must be smaller than d_sae=64"),
        ({"betas": "0.9"}, "betas='0.9' needs 2 comma-separated values, got 1"),
        ({"lr": "nan"}, "lr=nan is not a finite number; the default is 0.0"),
        ({"device": "tpu"}, "device='tpu' must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_cross_field_and_nested_messages(overrides, msg):
    with pytest.raises(UserError) as e:
        F.build(C.TrainConfig, None, overrides)
    assert msg in str(e.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device):
    assert C.TrainConfig(device=device).device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_resolve_device_refuses_other_names(device):
    from saelab.models import resolve_device

    with pytest.raises(UserError, match=f"device '{device}' is not auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_resolve_device_refuses_a_missing_gpu():
    import torch

    from saelab.models import resolve_device

    n = torch.cuda.device_count()
    with pytest.raises(UserError, match="CUDA is not visible" if n == 0 else "CUDA device"):
        resolve_device(f"cuda:{n}")
    assert resolve_device("cpu").type == "cpu"


def test_numbers_from_strings():
    cfg = F.build(C.TrainConfig, None, {"n_tokens": "3e5", "seed": "12", "lr": "1e-3"})
    assert (cfg.n_tokens, cfg.seed, cfg.lr) == (300_000, 12, 1e-3)
