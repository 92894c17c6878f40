"""pytest plugin (entry point ``pytest11``) shipped with spon-toolkit.

It stays cheap to import: heavy imports happen inside fixtures and hooks.
"""

from __future__ import annotations

import pytest

# Fixtures for plugin authors (spon_make_toolkit, spon_make_context, spon_allocation_context, spon_allocate).
from spon_toolkit.testing.fixtures import (  # noqa: F401
    spon_allocate,
    spon_allocation_context,
    spon_make_context,
    spon_make_toolkit,
)


@pytest.fixture
def spon_tiny_model():
    """A tiny random Llama (2 layers, hidden 64) in eval mode, seeded."""
    from spon_toolkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture
def spon_toolkit_fresh(tmp_path):
    """A fresh :class:`spon_toolkit.Toolkit` with built-ins only (no entry points, an empty plugins dir)."""
    from spon_toolkit.plugins import Toolkit

    empty = tmp_path / "spon_plugins_empty"
    empty.mkdir()
    return Toolkit(plugins_dir=empty, load_entrypoints=False)


# --- experiment files: `pytest experiments/` collects exp_*.yaml --------------------------------------
# Each (sparsity, allocation, seed) of a file is one test item that runs through the same
# ExperimentRunner as `spon run`; items of one file share a runner (model, data, calibration, baselines).

def pytest_addoption(parser):
    group = parser.getgroup("spon", "spon-toolkit experiments (exp_*.yaml)")
    group.addoption("--spon-output-dir", default="results", metavar="DIR",
                    help="results directory for collected experiments (default: results/)")
    group.addoption("--spon-report", action="store_true",
                    help="after the session, build the executed notebook report of each experiment that asks for one")
    group.addoption("--spon-reports-dir", default="reports", metavar="DIR", help="where reports go (default: reports/)")
    group.addoption("--spon-fresh", action="store_true", help="start new runs instead of resuming finished items")


_RUNNERS = pytest.StashKey[dict]()
_TOOLKIT = pytest.StashKey[object]()


def session_toolkit(config):
    """The session's :class:`spon_toolkit.plugins.Toolkit`, built once from the environment (plugins
    directory, entry points, blocked plugins) the way ``spon run`` builds its own, and passed to every
    experiment of the session."""
    if _TOOLKIT not in config.stash:
        from spon_toolkit.plugins import Toolkit

        config.stash[_TOOLKIT] = Toolkit()
    return config.stash[_TOOLKIT]
_FINISHED_DIRS = pytest.StashKey[list]()


# --- pytest-xdist: `pytest experiments/ -n 4` spreads the items over workers ---------------------------
# Workers of one session join one run directory (resume: the latest run of the spec; --spon-fresh: the run
# tagged with the session's id) and claim items one by one (spon_toolkit.records), so an expectation that
# needs another worker's item waits for its record. Worker i takes CUDA device i (SPON_DEVICES overrides).

class _XdistController:
    def __init__(self):
        import uuid

        self.tag = uuid.uuid4().hex
        self.experiment_dirs: list[str] = []

    def pytest_configure_node(self, node):
        node.workerinput["spon_run_tag"] = self.tag

    def pytest_testnodedown(self, node, error):
        for d in getattr(node, "workeroutput", {}).get("spon_experiment_dirs", []):
            if d not in self.experiment_dirs:
                self.experiment_dirs.append(d)


def pytest_configure(config):
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        from spon_toolkit.scaleout import use_worker_device

        use_worker_device(int(workerinput["workerid"].lstrip("gw") or 0),
                          workers=int(workerinput.get("workercount", 1)))
    elif config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", None):
        config.pluginmanager.register(_XdistController(), "spon-xdist-controller")


def pytest_collect_file(file_path, parent):
    # Like pytest with an explicit .py file: a spec named on the command line is collected whatever its
    # name; inside directories only exp_*.yaml files are.
    if file_path.suffix in (".yaml", ".yml") and (file_path.name.startswith("exp_")
                                                    or parent.session.isinitpath(file_path)):
        return ExperimentFile.from_parent(parent, path=file_path)
    return None


class ExperimentFile(pytest.File):
    """An experiment YAML file; a spec error is a collection error naming file and key."""

    def collect(self):
        from spon_toolkit.errors import SponError
        from spon_toolkit.experiment import load_experiment

        try:
            experiment = load_experiment(self.path, session_toolkit(self.config))
        except SponError as exc:
            raise self.CollectError(str(exc)) from None
        for item in experiment.items():
            yield ExperimentItem.from_parent(self, name=item.name, spec_item=item)


class ExperimentItem(pytest.Item):
    def __init__(self, *, spec_item, **kwargs):
        super().__init__(**kwargs)
        self.spec_item = spec_item

    def _runner(self):
        from spon_toolkit.runner import ExperimentRunner

        runners = self.config.stash.setdefault(_RUNNERS, {})
        key = str(self.path)
        if key not in runners:
            opt = self.config.getoption
            workerinput = getattr(self.config, "workerinput", None)
            runners[key] = ExperimentRunner(self.spec_item.experiment, toolkit=session_toolkit(self.config),
                                            output_dir=opt("spon_output_dir"), resume=not opt("spon_fresh"),
                                            run_tag=None if workerinput is None else workerinput["spon_run_tag"])
        return runners[key]

    def runtest(self):
        outcome = self._runner().run_item(self.spec_item)
        for ok, msg in outcome.checks:
            self.add_report_section("call", "expectations", f"{'ok' if ok else 'FAILED'}: {msg}")

    def repr_failure(self, excinfo, style=None):
        from spon_toolkit.runner import ExpectationFailed, StageError

        exc = excinfo.value
        if isinstance(exc, ExpectationFailed):
            return "\n".join([f"{exc.item_id}: stage 'expectations' failed", *(f"  {m}" for m in exc.failures)])
        if isinstance(exc, StageError):
            return f"{exc.item_id}: stage '{exc.stage}' failed\n  {exc.cause.__class__.__name__}: {exc.cause}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    runners = config.stash.get(_RUNNERS, {})
    worker = hasattr(config, "workeroutput")
    reports = []
    for runner in runners.values():
        if runner.started:
            runner.finish()  # under xdist every worker rebuilds; the last to finish sees every item
            if config.getoption("spon_report") and runner.experiment.spec.report:
                reports.append(str(runner.manager.experiment_dir))
    if worker:  # the controller builds the reports once, after every worker is done
        config.workeroutput["spon_experiment_dirs"] = reports
        return
    controller = config.pluginmanager.get_plugin("spon-xdist-controller")
    if controller is not None:
        reports += [d for d in controller.experiment_dirs if d not in reports]
    if reports:
        from spon_toolkit.report import write_report

        for d in reports:
            write_report(d, config.getoption("spon_reports_dir"), session_toolkit(config))
