"""lm-evaluation-harness on the in-memory model: the offline tasks, hooks active inside lm-eval, agreement
with evaluate_perplexity, `spon lm-eval` (table, JSON, bad input) and experiments with `downstream:`."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'spon-toolkit[lmeval]')")

from spon_toolkit import cli  # noqa: E402
from spon_toolkit import lmeval as L  # noqa: E402
from spon_toolkit.checkpoint import save_checkpoint  # noqa: E402
from spon_toolkit.evaluate import block_nlls  # noqa: E402
from spon_toolkit.models import load_model  # noqa: E402
from spon_toolkit.sparse import SparseModel, SponBiases  # noqa: E402
from spon_toolkit.sparsifiers import MagnitudeSparsifier  # noqa: E402

NEWLINE = 10  # the byte tokenizer has no BOS/EOS: lm-eval's document prefix is the newline byte


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Task data is generated into the user cache: a temporary one for this module."""
    path = tmp_path_factory.mktemp("spon-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPON_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def tm():
    return L.task_manager(L.OFFLINE_TASKS)


@pytest.fixture
def tiny():
    return load_model("tiny-random", device="cpu")


def _per_doc_ll(out, task="sotu_ppl"):
    return [s["word_perplexity"][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_offline_task_data_is_deterministic_and_large_enough(cache_dir):
    from spon_toolkit import lmeval_data as D

    first = D.read_records(D.data_file("sotu_continuation", "eval"))
    path = D.data_file("sotu_continuation", "eval")
    path.unlink()  # regenerated from the sotu package: byte-identical
    again = D.read_records(D.data_file("sotu_continuation", "eval"))
    assert first == again
    # stderr of an accuracy is at most sqrt(0.25 / n): under 2 points needs n > 625
    assert len(first) > 625 and math.sqrt(0.25 / len(first)) < 0.02
    for item in first:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert 0 <= item["label"] < 4 and item["context"]
    labels = [item["label"] for item in first]
    assert min(labels.count(k) for k in range(4)) > len(first) / 8  # answer position is not a cue
    docs = D.read_records(D.data_file("sotu_ppl", "eval"))
    assert len({d["speech"] for d in docs}) == 8 and all(D.n_words(d["text"]) >= D.PPL_MIN_WORDS // 2 for d in docs)
    assert "2016-Obama-1" in {d["speech"] for d in docs}  # eval split only (2016-2026)
    assert all(int(d["speech"][:4]) >= 2016 for d in docs)
    validation = D.read_records(D.data_file("sotu_continuation", "validation"))
    assert all(2008 <= int(d["speech"][:4]) <= 2015 for d in validation)


def test_sentence_splitter_keeps_abbreviations():
    from spon_toolkit.lmeval_data import sentences

    text = "Mr. Speaker, Mrs. Smith came from the U.S. Army. She stayed! Did you? \"Yes.\" John F. Kennedy spoke."
    assert sentences(text) == ["Mr. Speaker, Mrs. Smith came from the U.S. Army.", "She stayed!", "Did you?",
                               "\"Yes.\"", "John F. Kennedy spoke."]


def test_local_tasks_run_through_lmeval_on_the_tiny_model(tiny, tm):
    model, tok = tiny
    lm = L.make_lm(model, tok, batch_size=4, prefix_token_id=NEWLINE)
    out = L.run_condition(lm, L.OFFLINE_TASKS, tm, limit=2)
    res = out["results"]
    assert out["n-samples"]["sotu_ppl"]["effective"] == 2 == out["n-samples"]["sotu_continuation"]["effective"]
    assert 0.0 <= res["sotu_continuation"]["acc,none"] <= 1.0
    assert res["sotu_continuation"]["acc_stderr,none"] >= 0.0  # lm-eval's stderr is reported
    # random weights over 256 bytes: about 8 bits per byte
    assert 7.0 < res["sotu_ppl"]["bits_per_byte,none"] < 9.0
    rows = L.task_rows(out)
    assert rows[("sotu_ppl", "bits_per_byte")]["stderr_source"] == "delta method over documents"
    assert rows[("sotu_ppl", "bits_per_byte")]["stderr"] > 0


def test_sparse_hooks_are_active_inside_lmeval_and_dense_equals_a_plain_model(tiny, tm):
    model, tok = tiny
    plain_model, _ = load_model("tiny-random", device="cpu")  # same seed, never hooked
    plain = L.run_condition(L.make_lm(plain_model, tok, prefix_token_id=NEWLINE), ["sotu_ppl"], tm, limit=2)
    biases = SponBiases(model, "down_proj")
    with torch.no_grad():
        for p in biases.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    lm = L.make_lm(model, tok, prefix_token_id=NEWLINE)
    states = L.conditions(model, sparsifier=MagnitudeSparsifier(0.7), sparse_sites=["down_proj"], biases=biases)
    assert list(states) == list(L.CONDITIONS)
    outs = {}
    for cond, state in states.items():
        with state():
            outs[cond] = L.run_condition(lm, ["sotu_ppl"], tm, limit=2)
    assert _per_doc_ll(outs["dense"]) == _per_doc_ll(plain)
    assert all(a != b for a, b in zip(_per_doc_ll(outs["dense"]), _per_doc_ll(outs["sparse"]), strict=True))
    assert all(a != b for a, b in zip(_per_doc_ll(outs["sparse"]), _per_doc_ll(outs["sparse+SPON"]), strict=True))
    # hooks removed afterwards: the model is a plain model again
    ids = torch.arange(32).unsqueeze(0)
    assert torch.equal(model(input_ids=ids).logits, plain_model(input_ids=ids).logits)
    comparison = L.compare(outs)
    paired = {p["comparison"]: p for p in comparison["paired"]}
    assert set(paired) == {"sparse - dense", "sparse+SPON - sparse", "sparse+SPON - dense"}
    row = comparison["table"][-1]
    assert row["metric"] == "bits_per_byte" and row["sparse"] - row["dense"] == pytest.approx(
        paired["sparse - dense"]["diff"], rel=1e-9)


@pytest.mark.parametrize("with_biases", [False, True])
def test_lmeval_loglikelihoods_agree_with_evaluate_perplexity(tiny, with_biases):
    model, tok = tiny
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(7))
    biases = None
    if with_biases:
        biases = SponBiases(model, "down_proj")
        with torch.no_grad():
            for p in biases.parameters():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    lm = L.make_lm(model, tok, batch_size=2, prefix_token_id=NEWLINE)
    with SparseModel(model, MagnitudeSparsifier(0.5), "down_proj", biases=biases):
        sums, counts = block_nlls(model, [ids[:3], ids[3:]], progress=False)  # other batching than lm-eval's
        agreement = L.loglikelihood_agreement(lm, ids, sums)
    assert counts == [23] * 5
    assert agreement["max_rel_diff"] < 1e-5 and agreement["max_abs_diff"] < 1e-3
    assert agreement["lm_eval_nll"] == pytest.approx(agreement["toolkit_nll"], rel=1e-6)


def test_ratio_stderr_is_the_delta_method():
    ll, units = [-10.0, -30.0, -20.0], [5.0, 10.0, 10.0]
    value, se = L.ratio_value_and_stderr(ll, units, "bits_per_byte")
    r = 60.0 / 25.0
    z = [10 - r * 5, 30 - r * 10, 20 - r * 10]
    assert value == pytest.approx(r / math.log(2))
    assert se == pytest.approx(math.sqrt(3 / 2 * sum(x * x for x in z)) / 25 / math.log(2))


# --- the command line -------------------------------------------------------------------------------

@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, _ = load_model("tiny-random", device="cpu")
    sparsifier = MagnitudeSparsifier(0.5)
    biases = SponBiases(model, "down_proj")
    with torch.no_grad():
        for p in biases.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return save_checkpoint(tmp_path / "ck.safetensors", biases, model=model, sparsifier=sparsifier,
                           sparse_sites=biases.sites)


def test_cli_table_and_json_with_a_checkpoint(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "lmeval.json"
    rc = cli.main(["lm-eval", "--model", "tiny-random", "--checkpoint", str(tiny_checkpoint), "--tasks",
                   "sotu_continuation", "--limit", "2", "--prefix-token-id", str(NEWLINE), "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "task" in printed and "sparse+SPON" in printed and "stderr" in printed
    data = json.loads(out.read_text())
    acc = next(r for r in data["table"] if r["metric"] == "acc")
    assert all(acc[c] is not None and acc[f"{c}_stderr"] is not None for c in L.CONDITIONS)
    assert data["protocol"]["checkpoint"] == str(tiny_checkpoint)
    assert data["protocol"]["data"]["sotu_continuation"]["eval"]["documents"] > 625
    assert data["lm_eval"]["dense"]["n-samples"]["sotu_continuation"]["effective"] == 2


def test_cli_exported_directory_gives_the_checkpoints_spon_numbers(tmp_path, tiny_checkpoint, capsys, builtin_toolkit):
    from spon_toolkit.export import export_checkpoint

    model, tok = load_model("tiny-random", device="cpu")
    export_checkpoint(tiny_checkpoint, model, tmp_path / "exported", tokenizer=tok, toolkit=builtin_toolkit)
    common = ["--model", "tiny-random", "--tasks", "sotu_ppl", "--limit", "2", "--prefix-token-id", str(NEWLINE)]
    assert cli.main(["lm-eval", "--checkpoint", str(tiny_checkpoint), *common, "-o", str(tmp_path / "a.json")]) == 0
    assert cli.main(["lm-eval", "--exported", str(tmp_path / "exported"), *common, "-o", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    rows = [{r["metric"]: r for r in json.loads((tmp_path / f).read_text())["table"]} for f in ("a.json", "b.json")]
    for cond in L.CONDITIONS:  # folded biases + re-attached sparsifier = hooked biases
        assert rows[1]["bits_per_byte"][cond] == pytest.approx(rows[0]["bits_per_byte"][cond], rel=1e-5)
    assert rows[0]["bits_per_byte"]["sparse+SPON"] != rows[0]["bits_per_byte"]["sparse"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "sotu_pp"], "unknown lm-eval task 'sotu_pp'. Close names: sotu_ppl"),
    (["--tasks", "sotu_ppl", "--limit", "0"], "--limit must be a number of documents >= 1"),
    (["--tasks", "sotu_ppl", "--num-fewshot", "2"], "takes no few-shot examples"),
    (["--tasks", "sotu_ppl,sotu_ppl"], "names a task twice"),
    (["--tasks", "sotu_ppl", "--sparsifier", "magnitud"], "Did you mean 'magnitude'?"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    rc = cli.main(["lm-eval", "--model", "tiny-random", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_cli_refuses_a_checkpoint_for_another_model(tmp_path, capsys):
    from spon_toolkit.testing.tiny import make_tiny_llama

    other = make_tiny_llama(num_layers=3)
    biases = SponBiases(other, "down_proj")
    path = save_checkpoint(tmp_path / "other.safetensors", biases, model=other, sparsifier=MagnitudeSparsifier(0.5),
                           sparse_sites=biases.sites)
    rc = cli.main(["lm-eval", "--model", "tiny-random", "--checkpoint", str(path), "--tasks", "sotu_ppl",
                   "--prefix-token-id", str(NEWLINE)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "is for a llama model with 3 layers" in err and "2 layers" in err


# --- experiments ------------------------------------------------------------------------------------

def test_experiment_downstream_lands_in_results_and_report_section(tmp_path):
    from spon_toolkit.builtin.downstream_sections import downstream
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.results import load_results
    from spon_toolkit.runner import run_experiment

    (tmp_path / "calib.txt").write_text("the cat sat on the mat and the dog ran far away " * 60)
    (tmp_path / "eval.txt").write_text("a bird flew over the tree while the sun went down " * 30)
    spec = tmp_path / "exp_ds.yaml"
    spec.write_text(
        "model: tiny-random\n"
        "data: {calibration_source: calib.txt, eval_source: eval.txt, block_size: 16, calibration_blocks: 4,"
        " eval_blocks: 2, batch_size: 2}\n"
        "sparsity: [0.5]\nallocations: [BASELINE-TEAL, UNIF-ALL]\n"
        "trainer: {name: kl, options: {epochs: 1, learning_rate: 0.01, progress: false}}\n"
        "report: false\n"
        "downstream: {tasks: [sotu_continuation], limit: 2, prefix_token_id: 10}\n")
    toolkit = Toolkit(load_entrypoints=False)
    sweep = run_experiment(load_experiment(spec, toolkit), toolkit=toolkit, output_dir=tmp_path / "out",
                           progress=False)
    assert not sweep.errors
    results = load_results(tmp_path / "out" / "ds")
    by_config = {r["config"]: r["downstream"] for r in results.records}
    acc = {c: next(r for r in d["table"] if r["metric"] == "acc") for c, d in by_config.items()}
    assert acc["BASELINE-TEAL"]["sparse+SPON"] == acc["BASELINE-TEAL"]["sparse"]  # no biases: the TEAL run
    assert acc["UNIF-ALL"]["dense"] == acc["BASELINE-TEAL"]["dense"]  # dense shared
    cells = downstream(results)
    assert len(cells) == 2 and "Downstream tasks" in cells[0]["source"]
    from spon_toolkit.report.downstream_views import downstream_frame

    frame = downstream_frame(tmp_path / "out" / "ds")
    assert set(frame["config"]) == {"BASELINE-TEAL", "UNIF-ALL"} and set(frame["task"]) == {"sotu_continuation"}


def test_experiment_spec_rejects_an_unknown_downstream_task(tmp_path):
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.plugins import Toolkit

    spec = tmp_path / "exp_bad.yaml"
    spec.write_text("model: tiny-random\nsparsity: [0.5]\nallocations: [UNIF-ALL]\ndownstream: [sotu_continuaton]\n")
    with pytest.raises(ConfigError, match=r"key 'downstream.tasks': unknown lm-eval task 'sotu_continuaton'.*"
                                          r"Close names: sotu_continuation"):
        load_experiment(spec, Toolkit(load_entrypoints=False))


@pytest.mark.slow
def test_real_model_lmeval_agrees_with_evaluate_perplexity():
    """smollm2-135m: lm-eval's loglikelihoods equal evaluate_perplexity's on the same sotu windows.

    Dense: to float tolerance. Sparse (top-k): lm-eval feeds T-1 tokens where the toolkit feeds T, and the
    float rounding of the two forwards can flip which of two nearly tied entries top-k keeps, so a block
    may move by a fraction of a nat (README, "Agreement"); the sum over blocks stays within 1e-3.
    """
    from spon_toolkit.data import load_blocks

    model, tok = load_model("smollm2-135m", device="cpu")
    blocks = load_blocks(tok, "sotu", "eval", 64).head(4)
    lm = L.make_lm(model, tok, batch_size=4)
    for sparsifier in (None, MagnitudeSparsifier(0.5)):
        with SparseModel(model, sparsifier, "down_proj" if sparsifier else ()):
            sums, _ = block_nlls(model, blocks.batches(2), progress=False)
            agreement = L.loglikelihood_agreement(lm, blocks.ids, sums)
        if sparsifier is None:
            assert agreement["max_rel_diff"] < 1e-5, agreement
        else:
            assert agreement["lm_eval_nll"] == pytest.approx(agreement["toolkit_nll"], rel=1e-3), agreement
