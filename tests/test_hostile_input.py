"""Hostile input: every bad input ends in one line naming the problem (exit 2), writes nothing, and never
produces a silently wrong number. Regression cases for the security holes (remote code from a string
flag, file names from data escaping their directory, pickled weights), edited results, misbehaving
plugins, concurrent writers and leftovers of killed runs; plus a fuzz of the spec loader."""

from __future__ import annotations

import json
import os
import random
import textwrap

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spon_toolkit import cli
from spon_toolkit.errors import ConfigError, PluginError, SponError
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit

WORDS = "the of and to a in that is for it as was with be by on not he this are or his from at which but".split()

SPEC = """\
model: tiny-random
data: {calibration_source: calib.txt, eval_source: eval.txt, block_size: 32, calibration_blocks: 8,
       eval_blocks: 4, batch_size: 2}
sparsifier: magnitude
sites: down_proj
sparsity: [0.5]
allocations: [BASELINE-TEAL, UNIF-ALL]
trainer: {name: kl, options: {epochs: 1, learning_rate: 0.01, logging_steps: 1, progress: false}}
seeds: [0]
report: false
"""


def write_texts(d):
    rng = random.Random(0)
    for name, n in (("calib.txt", 1500), ("eval.txt", 800)):
        (d / name).write_text(" ".join(rng.choice(WORDS) for _ in range(n)))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    write_texts(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return code, errors[-1] if errors else ""


def assert_one_line_error(code: int, line: str, *needles: str) -> None:
    assert code == 2, line
    assert line.startswith("error: ") and "Traceback" not in line
    for needle in needles:
        assert needle in line, line


# --- the spec: refused before any model work, nothing written ----------------------------------------

SPEC_CASES = {
    # security: remote code only for a real boolean
    "remote-code-string-no": ("model: tiny-random", "model: {loader: tiny-random, options: {trust_remote_code: 'no'}}",
                              "trust_remote_code"),
    "remote-code-string-false": ("model: tiny-random",
                                 "model: {loader: tiny-random, options: {trust_remote_code: 'false'}}",
                                 "trust_remote_code"),
    # wrong numbers: an empty site list used to become down_proj
    "empty-site-list": ("sites: down_proj", "sites: []", "key 'sites'"),
    "empty-site-string": ("sites: down_proj", "sites: ''", "key 'sites'"),
    "baseline-sparsify-biased": ("allocations: [BASELINE-TEAL, UNIF-ALL]",
                                 "allocations: [{name: BASELINE-TEAL, options: {sparsify: biased}}]",
                                 "sparsifies no site"),
    # silently accepted before
    "duplicate-key": ("seeds: [0]", "seeds: [0]\nseeds: [1]", "duplicate key 'seeds'"),
    "sparsity-bool": ("sparsity: [0.5]", "sparsity: [true]", "key 'sparsity[0]'"),
    "seed-bool": ("seeds: [0]", "seeds: [true]", "key 'seeds[0]'"),
    "epochs-fraction": ("epochs: 1,", "epochs: 2.7,", "'epochs'"),
    "epochs-zero": ("epochs: 1,", "epochs: 0,", "epochs must be >= 1"),
    "warmup-string": ("epochs: 1,", "epochs: 1, warmup_ratio: abc,", "'warmup_ratio'"),
    "logging-string": ("logging_steps: 1", "logging_steps: x", "'logging_steps'"),
    "betas-out-of-range": ("epochs: 1,", "epochs: 1, betas: [2, 3],", "betas"),
    "weight-decay-negative": ("epochs: 1,", "epochs: 1, weight_decay: -5,", "weight_decay"),
    "seed-negative": ("seeds: [0]", "seeds: [-1]", "key 'seeds'"),
    "unknown-allocation-option": ("allocations: [BASELINE-TEAL, UNIF-ALL]",
                                  "allocations: [{name: UNIF-ALL, options: {layerz: [1]}}]", "its options"),
    "bad-sparsifier-option": ("sparsifier: magnitude", "sparsifier: {name: magnitude, options: {foo: 1}}",
                              "sparsifier"),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_bad_spec_is_one_line_before_the_model(case, workdir, capsys, monkeypatch):
    old, new, needle = SPEC_CASES[case]
    assert old in SPEC
    (workdir / "exp.yaml").write_text(SPEC.replace(old, new))
    import spon_toolkit.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, needle)
    assert not (workdir / "out").exists()


def test_alias_bomb_is_bounded(workdir, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (workdir / "exp.yaml").write_text("bomb:\n" + "\n".join("  " + x for x in levels) + "\n" + SPEC)
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, "aliases")
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("content,needle", [
    (b"\x00\x01\x02binary\xff", "binary"),
    ("model: tiny-random\ndescription: caf\u00e9\n".encode("latin-1"), "not UTF-8"),
])
def test_binary_and_latin1_specs(content, needle, workdir, capsys):
    (workdir / "exp.yaml").write_bytes(content)
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, needle)


@pytest.mark.parametrize("options,needle", [
    ("{num_layers: -1}", "num_layers"),
    ("{hidden_size: 30}", "multiple of num_heads"),
])
def test_model_problems_are_reported_once_before_any_item(options, needle, workdir, capsys):
    (workdir / "exp.yaml").write_text(SPEC.replace("model: tiny-random", f"model: {{loader: tiny-random, options: {options}}}"))
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, needle, "exp.yaml")
    assert not (workdir / "out").exists()


def test_two_specs_with_one_name_are_refused(workdir, capsys):
    for name in ("a.yaml", "b.yaml"):
        (workdir / name).write_text("name: same\n" + SPEC)
    code, line = run_cli(capsys, "run", "a.yaml", "b.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, "'same'")
    assert not (workdir / "out").exists()


def test_trust_remote_code_is_a_real_boolean_in_python():
    from spon_toolkit.models import load_hf

    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_hf("some/model", trust_remote_code="no")


# --- output paths are checked before the work --------------------------------------------------------

@pytest.mark.parametrize("flag", ["--output", "--json", "--metrics-csv"])
def test_train_output_under_a_regular_file(flag, workdir, capsys, monkeypatch):
    (workdir / "afile").write_text("x")
    import spon_toolkit.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, line = run_cli(capsys, "train", "--model", "tiny-random", flag, "afile/out.x")
    assert_one_line_error(code, line, "afile")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only directories; run as an ordinary user")
def test_train_output_in_read_only_directory(workdir, capsys):
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, line = run_cli(capsys, "train", "--model", "tiny-random", "--output", "ro/ck.safetensors")
    assert_one_line_error(code, line, "not writable")


def test_train_negative_seed(workdir, capsys):
    code, line = run_cli(capsys, "train", "--model", "tiny-random", "--seed", "-1")
    assert_one_line_error(code, line, "seed")


# --- results on disk: edited, corrupt or hostile ------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny sweep (BASELINE-TEAL + UNIF-ALL) with a checkpoint."""
    d = tmp_path_factory.mktemp("finished")
    write_texts(d)
    (d / "exp.yaml").write_text(SPEC)
    old = os.getcwd()
    os.chdir(d)
    try:
        assert cli.main(["run", "exp.yaml", "--output-dir", "out"]) == 0
    finally:
        os.chdir(old)
    return d


def copy_results(finished, dest):
    import shutil

    shutil.copytree(finished / "out", dest / "out")
    shutil.copy(finished / "exp.yaml", dest / "exp.yaml")
    write_texts(dest)
    return dest / "out" / "exp"


def results_json(exp_dir):
    return next((exp_dir / "runs").glob("run_*/results.json"))


def test_edited_ppl_is_refused_on_resume_and_report(finished, workdir, capsys):
    exp_dir = copy_results(finished, workdir)
    path = results_json(exp_dir)
    data = json.loads(path.read_text())
    next(iter(data.values()))["ppl"] = -5
    path.write_text(json.dumps(data))
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, "ppl=-5")
    code, line = run_cli(capsys, "report", str(exp_dir), "--reports-dir", "reports")
    assert_one_line_error(code, line, "ppl=-5")
    assert not (workdir / "reports").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b"])
def test_experiment_name_from_metadata_cannot_escape(name, finished, workdir, capsys):
    exp_dir = copy_results(finished, workdir)
    meta = json.loads((exp_dir / "metadata.json").read_text())
    meta["experiment"] = name
    (exp_dir / "metadata.json").write_text(json.dumps(meta))
    before = set(workdir.parent.iterdir())
    code, line = run_cli(capsys, "report", str(exp_dir), "--reports-dir", "reports/inner")
    assert_one_line_error(code, line, "not a safe file name")
    assert set(workdir.parent.iterdir()) == before and not (workdir / "reports").exists()


@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_corrupt_metadata(content, needle, finished, workdir, capsys):
    exp_dir = copy_results(finished, workdir)
    (exp_dir / "metadata.json").write_text(content)
    code, line = run_cli(capsys, "report", str(exp_dir), "--reports-dir", "reports")
    assert_one_line_error(code, line, needle)
    code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
    assert_one_line_error(code, line, needle)


def _rewrite_checkpoint(src, dst, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["spon"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={**header, "spon": json.dumps(meta)})
    return dst


def _nan_first(tensors):
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))


def _sparsity_09(meta):
    meta["sparsity"] = 0.9


def _missing_layer(meta):
    meta["sites"] = [s.replace("layers.0.", "layers.7.") for s in meta["sites"]]


@pytest.mark.parametrize("edit,needle", [
    ({"edit_meta": _sparsity_09}, "sparsity 0.9"),
    ({"edit_tensors": _nan_first}, "NaN"),
    ({"edit_meta": _missing_layer}, "layers.7"),
])
def test_contradictory_checkpoint_is_not_exported(edit, needle, finished, workdir, capsys):
    exp_dir = copy_results(finished, workdir)
    src = next((exp_dir / "runs").glob("run_*/checkpoints/*.safetensors"))
    if "edit_meta" in edit and edit["edit_meta"] is _missing_layer:
        def both(tensors):
            for k in list(tensors):
                tensors[k.replace("layers.0.", "layers.7.")] = tensors.pop(k)
        edit = {**edit, "edit_tensors": both}
    ckpt = _rewrite_checkpoint(src, workdir / "bad.safetensors", **edit)
    code, line = run_cli(capsys, "export", str(ckpt), "--model", "tiny-random", "-o", "exported")
    assert_one_line_error(code, line, needle)
    assert not (workdir / "exported").exists()


# --- model directories -------------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    from spon_toolkit.models import byte_tokenizer
    from spon_toolkit.testing.tiny import make_tiny_llama

    d = tmp_path / "model"
    make_tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _contradict(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))


def _config_list(d):
    (d / "config.json").write_text("[1, 2]")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _pickle(d):
    (d / "model.safetensors").unlink()
    torch.save({"x": _Payload()}, d / "pytorch_model.bin")


@pytest.mark.parametrize("damage,needle", [(_truncate, "SafetensorError"), (_contradict, "contradicts"),
                                           (_config_list, "config.json"), (_pickle, "model.safetensors")])
def test_broken_model_directory(damage, needle, model_dir, workdir, capsys):
    damage(model_dir)
    code, line = run_cli(capsys, "eval", "--model", str(model_dir), "--data", "eval.txt", "--max-blocks", "1")
    assert_one_line_error(code, line, needle)
    assert not (workdir / "PWNED").exists()


# --- misbehaving plugins: the error names the plugin ---------------------------------------------------

BAD_PLUGINS = {
    "sparsifier-none": ("""
@hookimpl
def spon_register_sparsifiers(register):
    register("nothing", lambda sparsity, **o: None)
""", "sparsifier: nothing", "sparsifier 'nothing' (plugin 'bad')"),
    "trainer-none": ("""
class T:
    def train(self, sm, batches, **kw):
        return None
@hookimpl
def spon_register_trainers(register):
    register("lazy", lambda **o: T())
""", "trainer: lazy", "trainer 'lazy' (plugin 'bad') returned NoneType"),
    "analyzer-not-json": ("""
@hookimpl
def spon_register_analyzers(register):
    register("obj", lambda run: {"x": object()})
""", "analyzers: [obj]", "analyzer 'obj' (plugin 'bad')"),
    "loader-string": ("""
@hookimpl
def spon_register_model_loaders(register):
    register("strloader", lambda name, **kw: "not a model")
""", "model: strloader", "model loader 'strloader' (plugin 'bad')"),
    "hook-raises": ("""
@hookimpl
def spon_register_trainers(register):
    raise RuntimeError("boom")
""", "", "plugin 'bad' failed in spon_register_trainers"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_bad_plugin_answers_name_the_plugin(case, workdir, capsys):
    code_text, spec_line, needle = BAD_PLUGINS[case]
    (workdir / "plugins").mkdir()
    (workdir / "plugins" / "bad.py").write_text("from spon_toolkit import hookimpl\n" + textwrap.dedent(code_text))
    spec = SPEC
    if spec_line.startswith("sparsifier:"):
        spec = spec.replace("sparsifier: magnitude", spec_line)
    elif spec_line.startswith("trainer:"):
        spec = spec.replace("trainer: {name: kl,", "trainer: {name: lazy,")
    elif spec_line.startswith("model:"):
        spec = spec.replace("model: tiny-random", spec_line)
    elif spec_line:
        spec = spec + spec_line + "\n"
    (workdir / "exp.yaml").write_text(spec)
    code = cli.main(["--plugins-dir", "plugins", "run", "exp.yaml", "--output-dir", "out"])
    out = capsys.readouterr()
    text = out.err + out.out
    assert code in (1, 2) and "Traceback" not in text
    assert needle in text, text
    if code == 1:  # an item failed at its stage: the others and the sweep went on, the record says why
        assert "FAILED" in out.out


# --- concurrent writers and killed runs ------------------------------------------------------------------

def test_second_writer_refuses_naming_the_holder(workdir, capsys):
    import subprocess
    import sys

    (workdir / "exp.yaml").write_text(SPEC)
    holder = subprocess.Popen(
        [sys.executable, "-c", "from spon_toolkit.results import ExperimentManager; import sys, time; "
         "m = ExperimentManager('out', 'exp'); m.acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=workdir)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, line = run_cli(capsys, "run", "exp.yaml", "--output-dir", "out")
        assert_one_line_error(code, line, f"pid {holder.pid}", "in use by")
        assert not (workdir / "out" / "exp" / "runs").exists()
    finally:
        holder.kill()  # like kill -9: the OS releases the lock
        holder.wait()
    assert cli.main(["run", "exp.yaml", "--output-dir", "out"]) == 0


def test_leftover_temp_files_are_removed_on_next_start(finished, workdir, capsys):
    exp_dir = copy_results(finished, workdir)
    run_dir = results_json(exp_dir).parent
    leftovers = [run_dir / ".results.json.abc123.tmp", exp_dir / "aggregated" / ".summary.csv.x1.tmp"]
    for p in leftovers:
        p.write_text("half")
    assert cli.main(["run", "exp.yaml", "--output-dir", "out"]) == 0  # resumes, nothing to run
    assert not any(p.exists() for p in leftovers)


def test_stale_kernel_directory_is_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from spon_toolkit.report import remove_stale_kernel_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"spon-kernel-{int(dead.stdout)}-abc"
    live = tmp_path / f"spon-kernel-{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    remove_stale_kernel_dirs()
    assert not stale.exists() and live.exists()


def test_checkpoint_has_no_wall_clock_times(finished):
    from spon_toolkit.checkpoint import load_checkpoint

    ckpt = next((finished / "out" / "exp" / "runs").glob("run_*/checkpoints/*.safetensors"))
    assert "seconds" not in load_checkpoint(ckpt).metadata["training"]


def test_more_blocks_than_the_text_has_is_stated(finished):
    from spon_toolkit.data import load_blocks
    from spon_toolkit.models import byte_tokenizer

    blocks = load_blocks(byte_tokenizer(), str(finished / "eval.txt"), "eval", 32)
    n = len(blocks)
    assert blocks.head(n + 10).protocol()["blocks"] == f"all {n} ({n + 10} asked; the text has only {n})"
    assert blocks.sample(n + 1, 0).protocol()["blocks"].startswith(f"all {n} ")


# --- fuzz: random YAML trees never produce a traceback ---------------------------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from(["", "down_proj", "magnitude", "kl", "UNIF-ALL", "tiny-random", "abc", "0.5"]))
_tree = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.sampled_from(
                                                        ["name", "options", "loader", "sparsity", "epochs", "x"]),
                                                        inner, max_size=3)), max_leaves=8)
_KEYS = ["model", "data", "sparsifier", "sites", "sparsity", "allocations", "trainer", "seeds", "analyzers",
         "expect", "name", "report", "importance", "bogus"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_KEYS), _tree, max_size=8), st.booleans())
def test_spec_loader_fuzz(tmp_path, data, start_from_valid):
    tk = _fuzz_toolkit()
    if start_from_valid:
        data = {**yaml.safe_load(SPEC), **data}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_experiment(path, tk)
    except SponError as exc:  # anything else escaping is the failure this test looks for
        assert str(exc).startswith(str(path)) and "\n" not in str(exc).strip(), str(exc)


_TK: list[Toolkit] = []


def _fuzz_toolkit() -> Toolkit:
    if not _TK:
        _TK.append(Toolkit(load_entrypoints=False))
    return _TK[0]


def test_plugin_error_type_is_exact():
    from spon_toolkit.contracts import check_json

    with pytest.raises(PluginError, match="not JSON-serialisable"):
        check_json({"a": object()}, "analyzer 'x' (plugin 'p')")
    with pytest.raises(PluginError, match="returned list"):
        check_json([1], "analyzer 'x' (plugin 'p')")
