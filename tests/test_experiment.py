"""Experiment specs: validation messages, matrix expansion, stable ids, expectations, -k selection."""

from __future__ import annotations

import textwrap

import pytest

from spon_toolkit.errors import ConfigError, UnknownNameError
from spon_toolkit.experiment import Expectation, keyword_matcher, load_experiment

GOOD = """
model: tiny-random
data: {source: local.txt, block_size: 16, calibration_blocks: 2, eval_blocks: 2}
sparsifier: magnitude
sites: down_proj
sparsity: [0.5, 0.6]
allocations: [BASELINE-TEAL, UNIF-ALL, {name: TOP-50, label: TOP-HALF, options: {fraction: 0.5}}]
seeds: [0, 1]
expect:
  - ppl[UNIF-ALL] < ppl[BASELINE-TEAL]
  - ppl[TOP-HALF] <= 1.1 * ppl[UNIF-ALL]
"""


def write(tmp_path, text, name="exp_demo.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_matrix_expands_in_order_with_stable_ids(tmp_path):
    exp = load_experiment(write(tmp_path, GOOD))
    ids = [it.id for it in exp.items()]
    assert len(ids) == 2 * 3 * 2
    assert ids[:3] == ["exp_demo.yaml::BASELINE-TEAL[s=0.5,seed=0]", "exp_demo.yaml::BASELINE-TEAL[s=0.5,seed=1]",
                       "exp_demo.yaml::UNIF-ALL[s=0.5,seed=0]"]
    assert "exp_demo.yaml::TOP-HALF[s=0.6,seed=1]" == ids[-1]
    assert exp.name == "demo"
    # ids and hashes depend on the item's coordinates, not on the rest of the matrix
    fewer = load_experiment(write(tmp_path / "..", GOOD.replace("[0.5, 0.6]", "[0.6]"), "exp_demo.yaml"))
    a = {it.id: it.item_hash for it in exp.items()}
    b = {it.id: it.item_hash for it in fewer.items()}
    assert b and all(a[k] == v for k, v in b.items())
    assert exp.spec_hash != fewer.spec_hash


def test_expectations_belong_to_their_first_config(tmp_path):
    exp = load_experiment(write(tmp_path, GOOD))
    unif = exp.item("UNIF-ALL", 0.5, 0)
    assert [e.text for e in unif.expectations] == ["ppl[UNIF-ALL] < ppl[BASELINE-TEAL]"]
    assert exp.item("BASELINE-TEAL", 0.5, 0).expectations == []


def test_expectation_grammar_and_check():
    e = Expectation.parse("ppl[TOP-50] <= 1.05 * ppl[UNIF-ALL]")
    assert e.configs() == ["TOP-50", "UNIF-ALL"]
    ok, msg = e.check({"TOP-50": {"ppl": 10.4}, "UNIF-ALL": {"ppl": 10.0}})
    assert ok and "10.4" in msg
    ok, _ = e.check({"TOP-50": {"ppl": 10.6}, "UNIF-ALL": {"ppl": 10.0}})
    assert not ok
    assert Expectation.parse("damage_recovered[UNIF-ALL] > 0.2").check({"UNIF-ALL": {"damage_recovered": 0.1}})[0] is False
    for bad in ("ppl[A] << ppl[B]", "1 < 2", "perplexity[A] < 3", ""):
        with pytest.raises(ValueError):
            Expectation.parse(bad)


@pytest.mark.parametrize("patch, key, allowed", [
    (("[0.5, 0.6]", "[0.5, 1.5]"), "sparsity[1]", "less than or equal to 1"),
    (("[0.5, 0.6]", "[0.5, 0.5]"), "sparsity", "list each sparsity once"),
    (("[0.5, 0.6]", "[0.5, abc]"), "sparsity[1]", "valid number"),
    (("seeds: [0, 1]", "seeds: [0, 1]\nsedes: [2]"), "sedes", "allowed keys: name, description, model"),
    (("block_size: 16", "block_size: 2"), "data.block_size", "greater than or equal to 8"),
    (("label: TOP-HALF", "label: UNIF-ALL"), "allocations", "appears twice"),
    (("ppl[TOP-HALF] <=", "ppl[TOP-5O] <="), "(top level)", "not in 'allocations'"),
    (("model: tiny-random\n", ""), "model", "required key is missing"),
    (("label: TOP-HALF", "label: 'TOP HALF'"), "allocations[2].label", "letters, digits"),
])
def test_validation_errors_name_file_key_and_allowed(tmp_path, patch, key, allowed):
    path = write(tmp_path, GOOD.replace(*patch))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert f"key '{key}'" in msg
    assert allowed in msg


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "exp_missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML at line 2"):
        load_experiment(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))


def test_unknown_plugin_names_checked_against_toolkit(tmp_path, spon_toolkit_fresh):
    path = write(tmp_path, GOOD.replace("sparsifier: magnitude", "sparsifier: magnitud"))
    with pytest.raises(UnknownNameError) as info:
        load_experiment(path, spon_toolkit_fresh)
    msg = str(info.value)
    assert msg.startswith(f"{path}: key 'sparsifier.name': unknown sparsifier 'magnitud'")
    assert "Did you mean 'magnitude'?" in msg and "threshold" in msg


def test_keyword_matcher():
    ids = ["f.yaml::TOP-50[s=0.5,seed=0]", "f.yaml::TOP-25[s=0.5,seed=0]", "f.yaml::UNIF-ALL[s=0.6,seed=1]"]
    sel = lambda e: [i for i in ids if keyword_matcher(e)(i)]  # noqa: E731
    assert sel("TOP-50") == ids[:1]
    assert sel("top and not s=0.6") == ids[:2]
    assert sel("(TOP-25 or UNIF) and seed=1") == ids[2:]
    assert sel(None) == ids
    with pytest.raises(ConfigError, match="-k expression"):
        keyword_matcher("TOP and (UNIF")
