"""The plugin core: load order and sources, registries, blocking, errors, ``spon plugins``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from spon_toolkit import hookimpl
from spon_toolkit.cli import main
from spon_toolkit.errors import PluginError, UnknownNameError
from spon_toolkit.plugins import Toolkit, builtin_module_names

PLUGIN_SOURCE = textwrap.dedent(
    """
    from spon_toolkit import hookimpl
    from spon_toolkit.sparsifiers import MagnitudeSparsifier


    class HalfMagnitude(MagnitudeSparsifier):
        name = "{name}"


    @hookimpl
    def spon_register_sparsifiers(register):
        register("{name}", HalfMagnitude, description="test plugin")
    """
)


def make_distribution(root, dist="spon-demo-plugin", version="1.2.3", module="spon_demo_plugin", name="demo"):
    """A throwaway installed distribution: a module plus a .dist-info with an entry point."""
    (root / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=name))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[spon_toolkit]\n{name} = {module}\n")
    return root


@pytest.fixture
def empty_dir(tmp_path):
    d = tmp_path / "no_plugins"
    d.mkdir()
    return d


def test_builtins_register_sparsifiers_and_architectures(empty_dir):
    tk = Toolkit(plugins_dir=empty_dir, load_entrypoints=False)
    assert {"magnitude", "threshold"} <= set(tk.sparsifiers.names())
    assert tk.sparsifiers.entry("magnitude").plugin == "spon.sparsifiers"
    assert "llama" in tk.architectures and "qwen2" in tk.architectures
    sources = {i.name: i.source for i in tk.plugin_infos()}
    assert all(sources[f"spon.{m}"] == "builtin" for m in builtin_module_names())


def test_entry_point_plugin_is_loaded_with_its_distribution(tmp_path, monkeypatch, empty_dir):
    make_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    tk = Toolkit(plugins_dir=empty_dir, load_entrypoints=True)
    entry = tk.sparsifiers.entry("demo")
    assert entry.plugin == "demo"
    info = {i.name: i for i in tk.plugin_infos()}["demo"]
    assert info.source == "entrypoint" and info.location == "spon-demo-plugin==1.2.3"
    assert info.registers == {"sparsifiers": ["demo"]}


def test_autoload_can_be_disabled_by_environment(tmp_path, monkeypatch, empty_dir):
    make_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPON_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "demo" not in Toolkit(plugins_dir=empty_dir).sparsifiers
    monkeypatch.setenv("SPON_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "demo" in Toolkit(plugins_dir=empty_dir).sparsifiers


def test_plugins_dir_is_loaded_first(tmp_path):
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "local_sparsifier.py").write_text(PLUGIN_SOURCE.format(name="local"))
    (pdir / "_private.py").write_text("raise RuntimeError('never imported')\n")
    tk = Toolkit(plugins_dir=pdir, load_entrypoints=False)
    assert tk.sparsifiers.entry("local").plugin == "local_sparsifier"
    infos = tk.plugin_infos()
    assert infos[0].name == "local_sparsifier" and infos[0].source == "plugins-dir"


def test_block_plugins_by_name(tmp_path, monkeypatch, empty_dir):
    monkeypatch.setenv("SPON_BLOCK_PLUGINS", "spon.sparsifiers")
    tk = Toolkit(plugins_dir=empty_dir, load_entrypoints=False)
    assert "magnitude" not in tk.sparsifiers
    assert "spon.sparsifiers" not in {i.name for i in tk.plugin_infos()}


def test_duplicate_name_names_both_plugins(tmp_path):
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "clash.py").write_text(PLUGIN_SOURCE.format(name="magnitude"))
    tk = Toolkit(plugins_dir=pdir, load_entrypoints=False)
    with pytest.raises(PluginError, match="'magnitude' is registered twice: by plugin 'clash' and by plugin 'spon.sparsifiers'"):
        tk.catalogue("sparsifiers")


def test_unknown_name_lists_known_and_suggests(empty_dir):
    tk = Toolkit(plugins_dir=empty_dir, load_entrypoints=False)
    with pytest.raises(UnknownNameError) as info:
        tk.sparsifiers.get("magnitud")
    msg = str(info.value)
    assert "Did you mean 'magnitude'?" in msg and "Known: magnitude, threshold" in msg and "\n" not in msg


def test_broken_plugin_file_is_named(tmp_path):
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "broken.py").write_text("import does_not_exist_anywhere\n")
    with pytest.raises(PluginError, match=r"broken\.py' failed to import"):
        Toolkit(plugins_dir=pdir, load_entrypoints=False)


def test_missing_plugins_dir(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        Toolkit(plugins_dir=tmp_path / "nope", load_entrypoints=False)


def test_unknown_hook_in_a_plugin_is_reported(tmp_path):
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "typo.py").write_text(
        "from spon_toolkit import hookimpl\n\n@hookimpl\ndef spon_register_sparsifers(register):\n    pass\n"
    )
    with pytest.raises(PluginError, match="unknown hook"):
        Toolkit(plugins_dir=pdir, load_entrypoints=False)


def test_cli_plugins_json(empty_dir, capsys):
    assert main(["--plugins-dir", str(empty_dir), "plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert by_name["spon.sparsifiers"]["registers"]["sparsifiers"] == ["magnitude", "threshold"]
    assert by_name["spon.cmd_plugins"]["source"] == "builtin"


def test_cli_text_listing_shows_sources(empty_dir, capsys):
    assert main(["--plugins-dir", str(empty_dir), "plugins"]) == 0
    out = capsys.readouterr().out
    assert "spon.sparsifiers  [builtin: spon_toolkit.builtin.sparsifiers]" in out
    assert "sparsifiers: magnitude, threshold" in out


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spon_toolkit", "--plugins-dir", str(tmp_path / "missing"), "plugins"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: plugins directory") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


ALL_HOOKS_PLUGIN = textwrap.dedent(
    """
    from spon_toolkit import hookimpl
    from spon_toolkit.sites import ArchSpec


    @hookimpl
    def spon_register_architectures(register):
        register("my_arch", ArchSpec(layers="decoder.blocks"))


    @hookimpl
    def spon_register_model_loaders(register):
        register("my-loader", lambda name, **kw: ("model", "tokenizer"))


    @hookimpl
    def spon_register_sparsifiers(register):
        register("my-sparsifier", dict)


    @hookimpl
    def spon_register_allocations(register):
        register("MY-ALLOC", lambda context, **kw: [])


    @hookimpl
    def spon_register_importance_methods(register):
        register("my-importance", lambda *a, **kw: {})


    @hookimpl
    def spon_register_trainers(register):
        register("my-trainer", dict)


    @hookimpl
    def spon_register_analyzers(register):
        register("my-analyzer", lambda run, **kw: {"ok": True})


    @hookimpl
    def spon_register_report_sections(register):
        register("my-section", lambda results: [], order=5)


    def configure(parser):
        parser.add_argument("--shout", action="store_true")


    def run(args, toolkit):
        print("HELLO" if args.shout else "hello")
        return 3


    @hookimpl
    def spon_register_commands(register):
        register("hello", run, "say hello", configure=configure)
    """
)


def test_every_hook_reaches_its_catalogue(tmp_path, capsys):
    from spon_toolkit.plugins import KINDS

    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "everything.py").write_text(ALL_HOOKS_PLUGIN)
    tk = Toolkit(plugins_dir=pdir, load_entrypoints=False)
    registered = {i.name: i for i in tk.plugin_infos()}["everything"].registers
    assert set(registered) == set(KINDS), "each hook spec must feed its catalogue"
    assert tk.architectures.get("my_arch").layers == "decoder.blocks"
    assert tk.model_loaders.get("my-loader")("x") == ("model", "tokenizer")
    assert tk.report_sections.entry("my-section").meta == {"order": 5}
    assert tk.analyzers.get("my-analyzer")(None) == {"ok": True}
    # plugin commands are real sub-commands with their own arguments and exit status
    assert main(["--plugins-dir", str(pdir), "hello", "--shout"]) == 3
    assert capsys.readouterr().out == "HELLO\n"


# --- the toolkit is passed, never fetched ---------------------------------------------------------------

class _CustomArchAndSparsifier:
    """A plugin with an architecture the built-ins do not know (a Llama renamed 'renamed_llama', loaded by
    its own loader) and its own 'magnitude' sparsifier, which only loads when the built-in one is blocked."""

    __name__ = "custom_arch_and_sparsifier"
    sparsify_calls = 0

    @hookimpl
    def spon_register_architectures(self, register):
        from spon_toolkit.sites import ArchSpec

        register("renamed_llama", ArchSpec(), "a Llama under another model_type")

    @hookimpl
    def spon_register_model_loaders(self, register):
        def load(name_or_path, *, dtype=None, device="auto", **options):
            from spon_toolkit.models import load_tiny_random

            model, tok = load_tiny_random(dtype=dtype, device=device)
            model.config.model_type = "renamed_llama"
            return model, tok

        register("renamed-tiny", load)

    @hookimpl
    def spon_register_sparsifiers(self, register):
        from spon_toolkit.sparsifiers import MagnitudeSparsifier

        plugin = self

        class Counting(MagnitudeSparsifier):
            def function(self, site):
                inner = super().function(site)

                def fn(x):
                    type(plugin).sparsify_calls += 1
                    return inner(x)

                return fn

        register("magnitude", Counting, "magnitude top-k that counts its calls")


def test_sweep_uses_the_toolkit_it_is_given(tmp_path):
    """A registered architecture and a replaced built-in take effect in a whole sweep; the process-wide
    default toolkit (which knows neither) is never consulted."""
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.runner import run_experiment

    spec = tmp_path / "exp_custom.yaml"
    (tmp_path / "c.txt").write_text(" ".join(["the cat sat on the mat and the dog ran"] * 200))
    (tmp_path / "e.txt").write_text(" ".join(["a dog sat by the door while the cat slept"] * 100))
    spec.write_text("model: renamed-tiny\n"
                    "data: {calibration_source: c.txt, eval_source: e.txt, block_size: 32, calibration_blocks: 4,\n"
                    "       eval_blocks: 2, batch_size: 2}\n"
                    "sparsity: [0.5]\nallocations: [BASELINE-TEAL, UNIF-ALL]\n"
                    "trainer: {name: kl, options: {epochs: 1, progress: false}}\nreport: false\n")
    (tmp_path / "none").mkdir()
    tk = Toolkit(plugins_dir=tmp_path / "none", load_entrypoints=False, extra_plugins=[_CustomArchAndSparsifier()],
                 blocked={"spon.sparsifiers"})
    assert tk.sparsifiers.entry("magnitude").plugin == "custom_arch_and_sparsifier"
    sweep = run_experiment(load_experiment(spec, tk), toolkit=tk, output_dir=tmp_path / "results", progress=False)
    assert not sweep.errors, sweep.errors
    assert [o.record["config"] for o in sweep.outcomes] == ["BASELINE-TEAL", "UNIF-ALL"]
    assert all(o.record["ppl"] >= 1 for o in sweep.outcomes)
    assert _CustomArchAndSparsifier.sparsify_calls > 0  # the plugin's sparsifier ran, not the built-in
    with pytest.raises(UnknownNameError, match="architecture 'renamed_llama' is not supported"):
        from spon_toolkit.models import load_tiny_random
        from spon_toolkit.sites import SiteMap

        model, _ = load_tiny_random()
        model.config.model_type = "renamed_llama"
        SiteMap(model)  # without the toolkit's registry only the built-in architectures are known


@pytest.mark.parametrize("name", ["spon.architectures", "spon.cmd_plugins"])
def test_core_builtins_cannot_be_blocked(name, monkeypatch):
    monkeypatch.setenv("SPON_BLOCK_PLUGINS", name)
    with pytest.raises(PluginError, match=f"the built-in plugin '{name}' cannot be blocked"):
        Toolkit(load_entrypoints=False)
