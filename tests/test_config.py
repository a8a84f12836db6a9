"""Config building: YAML presets, dotted overrides, type coercion and clear errors."""

import pytest

from saelab import config as C
from saelab.errors import UserError


def test_field_docs_are_read_from_source():
    docs = C.field_docs(C.TrainConfig)
    assert docs["batch_size"] == "Tokens per optimizer step."
    assert set(docs) == {f for f in C.TrainConfig.__dataclass_fields__}


def test_every_field_of_every_config_has_a_doc():
    for cls in (C.HarvestConfig, C.SAEConfig, C.TrainConfig, C.EvalConfig):
        assert set(C.field_docs(cls)) == set(cls.__dataclass_fields__), cls.__name__


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("harvest: h\nsae:\n  k: 16\n  d_sae: 256\nlr: 0.001\n")
    cfg = C.build(C.TrainConfig, p, {"sae.k": "8", "wandb": "true", "betas": "0.8,0.9"})
    assert cfg.sae.k == 8 and cfg.sae.d_sae == 256 and cfg.lr == 0.001
    assert cfg.wandb is True and cfg.betas == (0.8, 0.9)
    assert isinstance(cfg.sae, C.SAEConfig)


def test_list_field_from_comma_string():
    cfg = C.build(
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
        C.build(C.TrainConfig, None, overrides)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        C.load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        C.load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        C.load_yaml(lst)


def test_lr_scaling_rule():
    cfg = C.TrainConfig(sae=C.SAEConfig(d_sae=2**14), lr_base=1e-3)
    assert cfg.resolved_lr() == pytest.approx(1e-3)
    cfg = C.TrainConfig(sae=C.SAEConfig(d_sae=2**12), lr_base=1e-3)
    assert cfg.resolved_lr() == pytest.approx(2e-3)
    assert C.TrainConfig(lr=5e-4).resolved_lr() == 5e-4


def test_harvest_checks():
    with pytest.raises(UserError, match="n_ctx=1"):
        C.HarvestConfig(n_ctx=1)
    with pytest.raises(UserError, match="hooks is empty"):
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
        C.build(cls, None, {old: 1})


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
        C.build(C.TrainConfig, None, {"sae.arch": "topkk"})
